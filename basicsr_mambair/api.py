"""The Python API: :func:`load_model` a checkpoint, :func:`restore` your images.

Example::

    from basicsr_mambair import load_model, restore

    model = load_model('MambaIR_SR4.pth')             # arch and arguments inferred from the weights
    model = load_model('net_g.pth', task='lightSR_x4')  # or an official preset (or opt='my_options.yml')
    sr = restore(model, rgb_uint8)                    # numpy (H, W[, C]) or PIL image -> same type, x scale

Images: see :mod:`basicsr_mambair.image_convert` (numpy RGB(A) / PIL, uint8 / uint16 / float in [0, 1];
gray and colour converted as the network needs and back; alpha passed through). Tiles (``tile``, LQ pixels)
bound the memory: overlapping tiles are blended (:func:`basicsr_mambair.tiling.forward_tiled`); ``tile=0``
runs the whole image at once, ``'auto'`` picks the largest tile whose estimated peak memory fits the free
memory (:func:`basicsr_mambair.memory.choose_tile`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .archs.assm import ROUTING_MODES
from .archs.support import FAMILIES, ArchInfo, describe, infer_config
from .errors import CheckpointError, ImageError, OptionError, OutOfMemory, RestoreError
from .image_convert import array_to_pil, check_finite_result, finish, is_pil, pil_to_array, prepare
from .memory import TILE_MULTIPLE, choose_tile, is_oom
from .options import read_option_file
from .presets import explain_preset_mismatch, get_preset, matching_presets
from .tiling import forward_tiled
from .utils.checkpoint import load_checked, read_state_dict, select_state_dict

__all__ = ['CheckpointError', 'ImageError', 'OutOfMemory', 'RestoreError', 'RestoreModel', 'load_model',
           'resolve_device', 'restore', 'restore_array']

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}

ImageLike = Any  # a numpy array or a PIL.Image.Image (Pillow is optional)


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class RestoreModel:
    """A loaded network ready for :func:`restore`.

    Attributes:
        net: the network, in eval mode, float32 weights, on ``device``.
        arch_type: the registered arch (``'MambaIR'``, ``'MambaIRUNet'``, ...).
        kwargs: its constructor arguments (``network_g`` without ``type``).
        scale: output size / input size (1 for denoising and JPEG artefact reduction).
        in_channels / out_channels: image channels the network takes / gives.
        device: where it runs.
        precision: ``'fp32'``, or ``'fp16'`` / ``'bf16'`` autocast (the selective scan stays float32).
        task: the preset named at loading (``task=...``), else None.
        presets: the official presets whose network has these parameters (e.g. all of ``CAR_10/30/40``), or none.
        source: where the weights came from.
        routing: the token routing the network uses in eval (``'deterministic'`` / ``'gumbel'``; MambaIRv2), or
            None for networks without routing.
    """

    net: nn.Module = field(repr=False)
    arch_type: str
    kwargs: dict[str, Any]
    scale: int
    in_channels: int
    out_channels: int
    device: torch.device
    precision: str = 'fp32'
    task: str | None = None
    presets: tuple[str, ...] = ()
    source: str = ''
    routing: str | None = None

    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) float32 in [0, 1] on ``device`` -> (B, out_channels, H*s, W*s) float32 (unclamped)."""
        dtype = PRECISIONS[self.precision]
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = self.net(lq)
        return out.float()  # blending and rounding in float32, whatever the autocast dtype

    @property
    def info(self) -> ArchInfo:
        """What the arch's support module says about this network (scale, channels, memory, size multiple)."""
        return describe(self.arch_type, self.kwargs)

    @property
    def name(self) -> str:
        """A short label: the preset name when known, else e.g. ``MambaIR x4``."""
        if self.task:
            return self.task
        if len(self.presets) == 1:
            return self.presets[0]
        return f'{self.arch_type} x{self.scale}' if self.scale > 1 else self.arch_type

    def describe(self) -> str:
        """One line: architecture, matching presets, scale, channels, parameters, device, precision."""
        params = sum(p.numel() for p in self.net.parameters())
        config = self.task or ('/'.join(self.presets) if self.presets else 'custom config')
        routing = f', {self.routing} routing' if self.routing else ''
        return (f'{self.arch_type} ({config}), x{self.scale}, {self.in_channels}->{self.out_channels} channels, '
                f'{params / 1e6:.2f} M params, {self.device} {self.precision}{routing}')


def resolve_device(device: str | torch.device | None = 'auto') -> torch.device:
    """``'auto'`` (CUDA if available, else CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``, checked."""
    if device is None or str(device) == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise RestoreError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise RestoreError('device cuda requested, but this PyTorch sees no CUDA GPU '
                               '(torch.cuda.is_available() is False); use --device cpu')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RestoreError(f'device {dev} requested, but there are {torch.cuda.device_count()} CUDA devices')
    elif dev.type != 'cpu':
        raise RestoreError(f'device {dev} is not supported (use auto, cpu, cuda or cuda:N)')
    return dev


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise RestoreError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == 'fp16' and device.type != 'cuda':
        raise RestoreError('half precision (--half) needs a CUDA device; on the CPU use --bf16 or full precision')
    if precision == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise RestoreError(f'{device} does not support bfloat16; use --half or full precision')


def _network_from_options(opt: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """(``network_g`` of an option file or dict, its top-level ``scale`` or None)."""
    if not isinstance(opt, Mapping):
        try:
            opt = read_option_file(os.fspath(opt))
        except OptionError as exc:
            raise RestoreError(str(exc)) from None
    network = opt.get('network_g')
    if not isinstance(network, Mapping) or 'type' not in network:
        raise RestoreError('the options have no network_g with a type')
    scale = opt.get('scale')
    network = {k: v for k, v in network.items() if k != 'compile'}  # a training option, not the arch's
    return network, (int(scale) if scale is not None else None)


def load_model(weights: str | os.PathLike | Mapping[str, torch.Tensor], task: str | None = None, *,
               opt: str | os.PathLike | Mapping[str, Any] | None = None, device: str | torch.device = 'auto',
               precision: str = 'fp32', param_key: str = 'params', routing: str | None = None) -> RestoreModel:
    """Build the network of a checkpoint and load its weights.

    Args:
        weights: a checkpoint file (``torch.save`` of ``{'params': state_dict}``, ``{'params_ema': ...}`` or a
            bare state dict; read with ``weights_only=True``, so pickled code is refused), or such a dict.
        task: an official preset (``classicSR_x4``, ``lightSR_x2``, ``colorDN_25``, ``CAR_10``, ``realDN``,
            ``v2_lightSR_x2``, ``v2_classicSR_Base_x4``, ...; see :data:`basicsr_mambair.presets.PRESETS`). The
            checkpoint must fit it exactly.
        opt: instead of ``task``: a BasicSR option file (or its dict); its ``network_g`` is built.
        device: ``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:N'``.
        precision: ``'fp32'``; ``'fp16'`` (CUDA only) or ``'bf16'`` run the network under autocast, with
            the selective scan kept in float32.
        param_key: the checkpoint entry holding the weights (falls back to ``params``, as BasicSR).
        routing: the token routing of a MambaIRv2 network: ``'deterministic'`` (the argmax of the route and a
            stable sort: the output is a function of the input) or ``'gumbel'`` (the official code's routing,
            Gumbel noise from the torch RNG also at test time: outputs vary from run to run unless seeded).
            None keeps the network's own choice (``network_g.routing`` of ``opt``), by default its eval
            routing, deterministic. Other networks have no routing: only None is accepted for them.

    Without ``task`` and ``opt`` the architecture and every parameter-shaping argument (arch family,
    embed_dim, depths, d_state, mlp_ratio, upsampler, upscale, channels; for MambaIRv2 also num_heads,
    window_size, inner_rank, num_tokens, ...) are inferred from the state dict's keys and shapes. Arguments
    that leave no trace in the weights keep their defaults (``img_range`` 1.0, as in every official config);
    pass ``opt`` for a network trained otherwise.

    Raises:
        FileNotFoundError: no such checkpoint file.
        CheckpointError: unreadable or unsafe checkpoint, not a MambaIR-family state dict (the message
            names the keys that disagree with the closest official preset), or weights not fitting ``task``/
            ``opt`` (the message names the config difference).
        RestoreError: bad ``task``/``opt``/``device``/``precision``/``routing``.
    """
    from basicsr.utils.registry import ARCH_REGISTRY

    if task is not None and opt is not None:
        raise RestoreError('give either a task preset or an option file, not both')
    dev = resolve_device(device)
    _check_precision(precision, dev)
    if routing is not None and routing not in ROUTING_MODES:
        raise RestoreError(f"unknown routing {routing!r} (use {' or '.join(ROUTING_MODES)})")

    if isinstance(weights, Mapping):  # a state dict, or a loaded checkpoint holding one under param_key
        source = 'the state dict'
        state_dict = select_state_dict(weights, param_key, source)
    else:
        source = os.fspath(weights)
        state_dict = read_state_dict(source, param_key=param_key)

    expected_scale = None
    if task is not None:
        try:
            preset = get_preset(task)
        except KeyError as exc:
            raise RestoreError(exc.args[0]) from None
        task = preset.name
        network = preset.network_g()
        expected_scale = preset.scale
    elif opt is not None:
        network, expected_scale = _network_from_options(opt)
    else:
        try:
            arch_type, kwargs = infer_config(state_dict)
        except CheckpointError as exc:
            raise CheckpointError(f'{exc}; {explain_preset_mismatch(state_dict)}') from None
        network = {'type': arch_type, **kwargs}

    arch_type = network.pop('type')
    if arch_type not in FAMILIES:
        raise RestoreError(f"network_g type {arch_type!r} is not supported (use {' or '.join(FAMILIES)})")
    try:
        net = ARCH_REGISTRY.get(arch_type)(**network)
    except (TypeError, ValueError) as exc:  # e.g. a misspelt argument in an option file
        raise RestoreError(f'cannot build {arch_type} from network_g: {exc}') from None
    load_checked(net, state_dict, strict=True, source=source)
    has_routing = hasattr(type(net), 'routing')  # MambaIRv2's property (duck-typed: no arch names here)
    if routing is not None:
        if not has_routing:
            raise RestoreError(f'routing {routing!r}: {arch_type} networks route no tokens (only None is accepted)')
        net.routing = routing
    net.eval().to(dev)
    for param in net.parameters():
        param.requires_grad_(False)

    info = describe(arch_type, network)
    if expected_scale is not None and expected_scale != info.scale:
        raise RestoreError(f'the options say scale {expected_scale}, but their network_g upscales by {info.scale}')
    try:
        presets = tuple(matching_presets(*infer_config(net.state_dict())))
    except Exception:  # noqa: BLE001  (a custom network from an option file: no preset, nothing to report)
        presets = ()
    return RestoreModel(net=net, arch_type=arch_type, kwargs=network, scale=info.scale, in_channels=info.in_channels,
                        out_channels=info.out_channels, device=dev, precision=precision, task=task, presets=presets,
                        source=source, routing=(net.routing or 'deterministic') if has_routing else None)



def check_tiling(tile: int | str | None, tile_overlap: int, tile_batch: int) -> None:
    """The tiling arguments of :func:`restore`, checked before any work (:class:`RestoreError` naming the bad one)."""
    def is_int(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not (tile is None or tile == 'auto' or (is_int(tile) and tile >= 0)):
        raise RestoreError(f"tile must be 'auto', None or 0 (the whole image) or a positive number of pixels, "
                           f'got {tile!r}')
    if not (is_int(tile_overlap) and tile_overlap >= 0):
        raise RestoreError(f'tile_overlap must be a number of pixels >= 0, got {tile_overlap!r}')
    if not (is_int(tile_batch) and tile_batch >= 1):
        raise RestoreError(f'tile_batch must be a number of tiles >= 1, got {tile_batch!r}')


def _forward(model: RestoreModel, lq: torch.Tensor, tile: int | str | None, overlap: int, tile_batch: int,
             progress: Callable[[int, int], None] | None) -> torch.Tensor:
    """(1, C, H, W) float32 in [0, 1] -> (1, C', H*s, W*s) float32, whole or tiled; OOM -> :class:`OutOfMemory`,
    a non-finite result -> :class:`ImageError`."""
    h, w = lq.shape[-2:]
    if tile == 'auto':
        tile = choose_tile(model.info, model.device, h, w, overlap)
    tile = int(tile or 0)
    try:
        if tile == 0 or tile >= max(h, w):
            out = model(lq.to(model.device))
            if progress is not None:
                progress(1, 1)
        else:
            out = forward_tiled(model, lq.to(model.device), model.scale, tile, overlap, tile_batch, progress)
        out = out.cpu()
        check_finite_result(out)
        return out
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        if model.device.type == 'cuda':
            torch.cuda.empty_cache()  # let the next image start from a clean cache
        used = tile if 0 < tile < max(h, w) else max(h, w)
        suggestion = max(TILE_MULTIPLE, used // 2 // TILE_MULTIPLE * TILE_MULTIPLE)
        what = f'with tile {tile}' if 0 < tile < max(h, w) else f'on the whole {w}x{h} image'
        raise OutOfMemory(f'out of memory on {model.device} {what}; try --tile {suggestion}', suggestion) from None


# ----------------------------------------------------------------------------------------------------------------
# Images


def restore_array(model: RestoreModel, image: np.ndarray, *, tile: int | str | None = 'auto',
                   tile_overlap: int = 32, tile_batch: int = 1, bgr: bool = False,
                   progress: Callable[[int, int], None] | None = None, with_input: bool = False,
                   clip: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(restored image, the input as the network saw it in the result's layout, or None) of a numpy image.

    What :func:`restore` does for numpy arrays, plus the input view that ``mambair-restore --compare`` shows.
    """
    check_tiling(tile, tile_overlap, tile_batch)
    prep = prepare(image, model.in_channels, bgr, clip)
    lq = torch.from_numpy(prep.colour.transpose(2, 0, 1).copy())[None]
    out = _forward(model, lq, tile, tile_overlap, tile_batch, progress)
    result = finish(out[0].numpy().transpose(1, 2, 0), prep, model.scale)
    shown = finish(prep.colour, prep, 1) if with_input else None
    return result, shown


def restore(model: RestoreModel, image: ImageLike, *, tile: int | str | None = 'auto', tile_overlap: int = 32,
            tile_batch: int = 1, bgr: bool = False, progress: Callable[[int, int], None] | None = None,
            clip: bool = False) -> ImageLike:
    """Restore one image with a model from :func:`load_model`.

    Args:
        model: from :func:`load_model`.
        image: numpy ``(H, W)`` or ``(H, W, C)`` with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA);
            ``uint8``, ``uint16`` or float in [0, 1]. Or a PIL image (see the module docstring).
        tile: LQ tile side in pixels; 0 or None = the whole image at once; ``'auto'`` = the whole image if it
            fits into the free memory, else the largest tile that does (:func:`choose_tile`).
        tile_overlap: LQ pixels shared by neighbouring tiles (blended linearly).
        tile_batch: tiles per network call.
        bgr: numpy colour channels are in OpenCV's BGR(A) order (the result is too).
        progress: ``progress(tiles_done, tiles_total)`` after each network call.
        clip: clip float images to [0, 1] (by default values outside are an :class:`ImageError`).

    Returns:
        The restored image, ``model.scale`` times larger, of the input's type (numpy / PIL), dtype and channel
        layout (float results are float32 in [0, 1]); see :mod:`basicsr_mambair.image_convert`.

    Raises:
        RestoreError: a bad ``tile`` / ``tile_overlap`` / ``tile_batch``.
        ImageError: unsupported image layout or dtype, NaN/Inf pixels, float values outside [0, 1] (without
            ``clip``), a result with NaN/Inf values (broken weights); :class:`OutOfMemory` (with
            ``suggested_tile``) when the forward ran out of memory.
    """
    if is_pil(image):
        result, _ = restore_array(model, pil_to_array(image), tile=tile, tile_overlap=tile_overlap,
                                   tile_batch=tile_batch, progress=progress, clip=clip)
        return array_to_pil(result)
    if not isinstance(image, np.ndarray):
        raise ImageError(f'expected a numpy array or a PIL image, got {type(image).__name__}')
    result, _ = restore_array(model, image, tile=tile, tile_overlap=tile_overlap, tile_batch=tile_batch,
                               bgr=bgr, progress=progress, clip=clip)
    return result
