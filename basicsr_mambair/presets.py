"""The official MambaIR / MambaIRUNet network configurations by task name, and matching weights against them.

``network_g`` arguments are exactly those of the official test option files (spec Table A; the
train files are identical up to ignored leftovers such as ``window_size``; MambaIRv2 colour DN sigma 25 / 50,
which have train files only, as sigma 15); the evaluation
convention (scale, metric crop border, Y channel) is that of the official test files (Table C).

Example::

    preset = get_preset('lightSR_x4')
    preset.network_g()  # {'type': 'MambaIR', 'upscale': 4, 'in_chans': 3, ..., 'upsampler': 'pixelshuffledirect'}
    preset.crop_border, preset.test_y_channel  # (4, True)

Names: MambaIR ``classicSR_x2/x3/x4``, ``lightSR_x2/x3/x4``, ``colorDN_15/25/50``, ``CAR_10/30/40``; MambaIRUNet
``realDN``; MambaIRv2 the same task names with a ``v2_`` prefix, the classic-SR ones with the model size:
``v2_lightSR_x2/x3/x4``, ``v2_classicSR_{Small,Base,Large}_x2/x3/x4``, ``v2_colorDN_15/25/50``, ``v2_CAR_10/30/40``
(colour DN sigma 25 / 50 have official training options but no released weights).

:func:`matching_presets` says which presets a configuration (from
:func:`basicsr_mambair.archs.support.infer_config`) is; :func:`explain_preset_mismatch` how a state dict
differs from the closest one.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .archs.support import constructor_defaults, detect_arch_type
from .errors import CheckpointError
from .utils.checkpoint import short_list, strip_module_prefix


@dataclass(frozen=True)
class Preset:
    """One official configuration.

    Attributes:
        name: task name (the key in :data:`PRESETS`).
        arch_type: registered arch class (``network_g.type``).
        kwargs: ``network_g`` arguments (without ``type``), as in the official option file.
        scale: the option file's top-level ``scale`` (SR factor; 1 for restoration).
        in_channels: image channels the network expects (1 = grayscale for CAR).
        task: dataset ``task`` of the official options: ``'SR'``, ``'denoising_color'``, ``'CAR'``, or
            ``'real_denoising'`` (the Restormer-style SIDD pipeline).
        noise: Gaussian noise sigma on the 0-255 scale (``denoising_color``), else None.
        jpeg_quality: JPEG quality of the inputs (``CAR``), else None.
        crop_border: pixels cropped on each side before PSNR/SSIM.
        test_y_channel: PSNR/SSIM on the Y channel of YCbCr (a no-op for 1-channel images).
        test_sets: the official test sets of the task.
    """

    name: str
    arch_type: str
    kwargs: dict[str, Any]
    scale: int
    in_channels: int
    task: str
    noise: int | None = None
    jpeg_quality: int | None = None
    crop_border: int = 0
    test_y_channel: bool = False
    test_sets: tuple[str, ...] = field(default_factory=tuple)

    def network_g(self) -> dict[str, Any]:
        """A fresh ``network_g`` option dict: ``{'type': arch_type, **kwargs}`` (safe to modify)."""
        return {'type': self.arch_type, **copy.deepcopy(self.kwargs)}

    def build(self):
        """A new, randomly initialised network of this configuration (``torch.nn.Module``)."""
        from basicsr.utils.registry import ARCH_REGISTRY

        return ARCH_REGISTRY.get(self.arch_type)(**copy.deepcopy(self.kwargs))


_SR_SETS = ('Set5', 'Set14', 'B100', 'Urban100', 'Manga109')


def _classic_sr(scale: int) -> Preset:
    return Preset(
        name=f'classicSR_x{scale}', arch_type='MambaIR', scale=scale, in_channels=3, task='SR',
        kwargs={'upscale': scale, 'in_chans': 3, 'img_size': 64, 'img_range': 1.0, 'd_state': 16,
                'depths': [6, 6, 6, 6, 6, 6], 'embed_dim': 180, 'mlp_ratio': 2, 'upsampler': 'pixelshuffle',
                'resi_connection': '1conv'},
        crop_border=scale, test_y_channel=True, test_sets=_SR_SETS)


def _light_sr(scale: int) -> Preset:
    return Preset(
        name=f'lightSR_x{scale}', arch_type='MambaIR', scale=scale, in_channels=3, task='SR',
        kwargs={'upscale': scale, 'in_chans': 3, 'img_size': 64, 'img_range': 1.0, 'd_state': 10,
                'depths': [6, 6, 6, 6], 'embed_dim': 60, 'mlp_ratio': 1.2, 'upsampler': 'pixelshuffledirect',
                'resi_connection': '1conv'},
        crop_border=scale, test_y_channel=True, test_sets=_SR_SETS)


def _color_dn(sigma: int) -> Preset:
    return Preset(
        name=f'colorDN_{sigma}', arch_type='MambaIR', scale=1, in_channels=3, task='denoising_color', noise=sigma,
        kwargs={'upscale': 1, 'in_chans': 3, 'img_size': 128, 'img_range': 1.0, 'd_state': 16,
                'depths': [6, 6, 6, 6, 6, 6], 'embed_dim': 180, 'mlp_ratio': 1.2},
        crop_border=0, test_y_channel=False, test_sets=('CBSD68', 'Kodak24', 'McMaster', 'Urban100'))


def _car(quality: int) -> Preset:
    return Preset(
        name=f'CAR_{quality}', arch_type='MambaIR', scale=1, in_channels=1, task='CAR', jpeg_quality=quality,
        kwargs={'upscale': 1, 'in_chans': 1, 'img_size': 126, 'd_state': 16, 'depths': [6, 6, 6, 6, 6, 6],
                'embed_dim': 180, 'mlp_ratio': 1.2},
        crop_border=0, test_y_channel=True, test_sets=('Classic5', 'LIVE1'))


def _real_dn() -> Preset:
    # realDenoising/options/train_MambaIR_RealDN.yml; its validation: PSNR, crop 0, RGB, reflect-padded to 8.
    return Preset(
        name='realDN', arch_type='MambaIRUNet', scale=1, in_channels=3, task='real_denoising',
        kwargs={'inp_channels': 3, 'out_channels': 3, 'dim': 48, 'num_blocks': [4, 6, 6, 8],
                'num_refinement_blocks': 4, 'mlp_ratio': 1.5, 'bias': False, 'dual_pixel_task': False},
        crop_border=0, test_y_channel=False, test_sets=('SIDD', 'DND'))


def _real_sr() -> Preset:
    """Real-world SR x4 (Real-ESRGAN degradations, ``options/train/train_MambaIR_RealESR{Net,GAN}_x4.yml``).

    Our assumption, not an official configuration: the official repository ships no option file for its
    released ``MambaIR_realSR`` weights (Google Drive ``16BBSRz1HellkTgypu4wu3CHA20CLgpSY``, spec 6.1), and the
    maintainers say the real-SR network "is the same as classicSR" (csguoh/MambaIR#74). We take the classic-SR
    x4 body with the ``nearest+conv`` head of SwinIR's real-SR models (MambaIRv2's code has it too). Config
    inference reads the head from the weights, so checkpoints with the pixelshuffle head load too (as
    ``classicSR_x4``). ``task='real_SR'`` (ours): Real-ESRGAN degradations; real LQ images have no ground truth,
    so no reference metrics (NIQE instead).
    """
    kwargs = dict(_classic_sr(4).kwargs, upsampler='nearest+conv')
    return Preset(name='realSR_x4', arch_type='MambaIR', scale=4, in_channels=3, task='real_SR', kwargs=kwargs,
                  crop_border=4, test_y_channel=False, test_sets=('RealSRSet',))


# MambaIRv2 (options/{train,test}/mambairv2/*.yml of the official main branch): Base-sized attention / ASSM
# settings shared by every config but the light one.
_V2 = {'img_size': 64, 'window_size': 16, 'inner_rank': 64, 'num_tokens': 128, 'convffn_kernel_size': 5,
       'mlp_ratio': 2.0, 'd_state': 16}
# embed_dim, depths, num_heads of the classic-SR sizes
V2_CLASSIC_SIZES = {'Small': (132, [4] * 6, [4] * 6), 'Base': (174, [6] * 6, [6] * 6), 'Large': (174, [6] * 9, [6] * 9)}


def _v2_light_sr(scale: int) -> Preset:
    return Preset(
        name=f'v2_lightSR_x{scale}', arch_type='MambaIRv2Light', scale=scale, in_channels=3, task='SR',
        kwargs={'upscale': scale, 'in_chans': 3, 'img_size': 64, 'img_range': 1.0, 'embed_dim': 48,
                'd_state': 8, 'depths': [5] * 4, 'num_heads': [4] * 4, 'window_size': 16, 'inner_rank': 32,
                'num_tokens': 64, 'convffn_kernel_size': 5, 'mlp_ratio': 1.0, 'upsampler': 'pixelshuffledirect',
                'resi_connection': '1conv'},
        crop_border=scale, test_y_channel=True, test_sets=_SR_SETS)


def _v2_classic_sr(size: str, scale: int) -> Preset:
    embed_dim, depths, heads = V2_CLASSIC_SIZES[size]
    return Preset(
        name=f'v2_classicSR_{size}_x{scale}', arch_type='MambaIRv2', scale=scale, in_channels=3, task='SR',
        kwargs={'upscale': scale, 'in_chans': 3, 'img_range': 1.0, 'embed_dim': embed_dim, 'depths': list(depths),
                'num_heads': list(heads), **_V2, 'upsampler': 'pixelshuffle', 'resi_connection': '1conv'},
        crop_border=scale, test_y_channel=True, test_sets=_SR_SETS)


def _v2_color_dn(sigma: int) -> Preset:
    return Preset(
        name=f'v2_colorDN_{sigma}', arch_type='MambaIRv2', scale=1, in_channels=3, task='denoising_color',
        noise=sigma,
        kwargs={'upscale': 1, 'in_chans': 3, 'img_range': 1.0, 'embed_dim': 174, 'depths': [6] * 6,
                'num_heads': [6] * 6, **_V2, 'img_size': 128},
        crop_border=0, test_y_channel=False, test_sets=('CBSD68', 'Kodak24', 'McMaster', 'Urban100'))


def _v2_car(quality: int) -> Preset:
    return Preset(
        name=f'v2_CAR_{quality}', arch_type='MambaIRv2', scale=1, in_channels=1, task='CAR', jpeg_quality=quality,
        kwargs={'upscale': 1, 'in_chans': 1, 'embed_dim': 174, 'depths': [6] * 6, 'num_heads': [6] * 6, **_V2,
                'img_size': 126},
        crop_border=0, test_y_channel=True, test_sets=('Classic5', 'LIVE1'))


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        *(_classic_sr(s) for s in (2, 3, 4)),
        *(_light_sr(s) for s in (2, 3, 4)),
        *(_color_dn(n) for n in (15, 25, 50)),
        *(_car(q) for q in (10, 30, 40)),
        _real_dn(),
        _real_sr(),
        *(_v2_light_sr(s) for s in (2, 3, 4)),
        *(_v2_classic_sr(size, s) for size in V2_CLASSIC_SIZES for s in (2, 3, 4)),
        *(_v2_color_dn(n) for n in (15, 25, 50)),
        *(_v2_car(q) for q in (10, 30, 40)),
    )
}


def preset_names() -> list[str]:
    """All preset names, in a stable order."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive); unknown names raise ``KeyError`` listing the known ones."""
    if name in PRESETS:
        return PRESETS[name]
    by_lower = {key.lower(): preset for key, preset in PRESETS.items()}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    raise KeyError(f"unknown MambaIR task preset {name!r}; known: {', '.join(PRESETS)}")


def matching_presets(arch_type: str, config: Mapping[str, Any]) -> list[str]:
    """Names of the official presets whose network has exactly ``config`` (as returned by ``infer_config``).

    Several presets share one network (``colorDN_15/25/50``, ``CAR_10/30/40``): all are returned, in
    :data:`PRESETS` order; ``[]`` for a config of no official task.
    """
    names = []
    for name, preset in PRESETS.items():
        if preset.arch_type != arch_type:
            continue
        full = {**constructor_defaults(arch_type), **preset.kwargs}
        if all(full.get(key) == value for key, value in config.items()):
            names.append(name)
    return names


@functools.cache
def _preset_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(key, shape) of every entry of the state dict of the preset's network (built once on the CPU)."""
    net = PRESETS[name].build()
    return tuple((key, tuple(value.shape)) for key, value in net.state_dict().items())


def explain_preset_mismatch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """How ``state_dict`` differs from the official preset it comes closest to, in one line.

    Closest = most keys with the preset's name and shape, among the presets of the state dict's arch family
    when its keys show one (else among all). The text names that preset (and those sharing its network),
    how many of its keys agree, and the first few wrongly shaped, missing and unexpected keys.
    """
    state_dict = strip_module_prefix(state_dict)
    ours = {key: tuple(value.shape) for key, value in state_dict.items()}
    try:
        family = detect_arch_type(state_dict)
    except CheckpointError:
        family = None
    candidates = [p for p in PRESETS.values() if p.arch_type == family] or list(PRESETS.values())
    networks: dict[tuple[str, str], list[str]] = {}  # presets sharing one network (colorDN_15/25/50) count once
    for preset in candidates:
        networks.setdefault((preset.arch_type, repr(preset.kwargs)), []).append(preset.name)
    groups = {_preset_shapes(names[0]): names for names in networks.values()}

    def score(shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[int, int]:
        agree = sum(ours.get(key) == want for key, want in shapes)
        return agree, -(len(shapes) + len(ours) - 2 * agree)  # most agreeing keys, then fewest others

    shapes, names = max(groups.items(), key=lambda item: score(item[0]))
    theirs = dict(shapes)
    label = '/'.join(names)
    wrong = [f'{k} {ours[k]} vs {v}' for k, v in theirs.items() if k in ours and ours[k] != v]
    missing = [k for k in theirs if k not in ours]
    unexpected = [k for k in ours if k not in theirs]
    parts = [f'closest official preset: {label} ({PRESETS[names[0]].arch_type}; {score(shapes)[0]} of its '
             f'{len(theirs)} keys agree)']
    if wrong:
        parts.append(f'wrongly shaped ({len(wrong)}; checkpoint vs preset): {short_list(wrong)}')
    if missing:
        parts.append(f'missing ({len(missing)}): {short_list(missing)}')
    if unexpected:
        parts.append(f'unexpected ({len(unexpected)}): {short_list(unexpected)}')
    return '; '.join(parts)
