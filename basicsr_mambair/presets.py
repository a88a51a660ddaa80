"""The official MambaIR / MambaIRUNet network configurations, by task name.

``network_g`` arguments are exactly those of the official test option files (spec Table A; the
train files are identical up to ignored leftovers such as ``window_size``); the evaluation
convention (scale, metric crop border, Y channel) is that of the official test files (Table C).

Example::

    preset = get_preset('lightSR_x4')
    preset.network_g()  # {'type': 'MambaIR', 'upscale': 4, 'in_chans': 3, ..., 'upsampler': 'pixelshuffledirect'}
    preset.crop_border, preset.test_y_channel  # (4, True)

Names: ``classicSR_x2/x3/x4``, ``lightSR_x2/x3/x4``, ``colorDN_15/25/50``, ``CAR_10/30/40``, ``realDN``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


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


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        *(_classic_sr(s) for s in (2, 3, 4)),
        *(_light_sr(s) for s in (2, 3, 4)),
        *(_color_dn(n) for n in (15, 25, 50)),
        *(_car(q) for q in (10, 30, 40)),
        _real_dn(),
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
