"""Restoring your own images with a MambaIR / MambaIRUNet checkpoint: :func:`load_model` and :func:`restore`.

Example::

    from basicsr_mambair import load_model, restore

    model = load_model('MambaIR_SR4.pth')             # arch and arguments inferred from the weights
    model = load_model('net_g.pth', task='lightSR_x4')  # or an official preset (or opt='my_options.yml')
    sr = restore(model, rgb_uint8)                    # numpy (H, W[, C]) or PIL image -> same type, x scale

Images: numpy arrays are RGB(A) in channel order (as PIL, imageio and scikit-image give them; pass
``bgr=True`` for OpenCV arrays), ``uint8``, ``uint16`` (16-bit, kept) or float in [0, 1]; PIL images
of mode L, LA, RGB, RGBA or I;16 (others are converted to RGB(A) first). The result has the input's
type, dtype and channel layout, ``scale`` times larger:

* colour image, 1-channel model (CAR): converted to gray with OpenCV's luma weights
  (0.299 R + 0.587 G + 0.114 B, as ``cv2.imread(..., IMREAD_GRAYSCALE)``); the result is gray;
* gray image, 3-channel model: replicated to RGB, restored, and the result converted back to gray
  the same way, so a gray image stays gray;
* alpha: not restored; passed through (scale 1) or resized with OpenCV's bicubic (SR) and re-attached.

Tiles (``tile``, LQ pixels) bound the memory: overlapping tiles are blended linearly
(:func:`basicsr_mambair.inference.forward_tiled`); ``tile=0`` runs the whole image at once, and
``'auto'`` picks the largest tile whose estimated peak memory fits the free memory
(:func:`choose_tile`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .inference import forward_tiled
from .ops.scan import uses_fused_kernel

__all__ = ['ImageError', 'OutOfMemory', 'RestoreError', 'RestoreModel', 'activation_bytes_per_pixel',
           'available_memory', 'choose_tile', 'load_model', 'resolve_device', 'restore']

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
SUPPORTED_ARCHS = ('MambaIR', 'MambaIRUNet')

# --- memory model of the automatic tile size --------------------------------------------------------------------
# Peak activation memory of one eval/no_grad forward, per LQ pixel, float32, measured on the CPU with
# torch.profiler(profile_memory=True) as the slope between two tile sizes (40/56, 48/96 or 64/128 px;
# benchmarks/bench_memory.py): lightSR (d_inner 72) 6.2-6.5 kB, colorDN / CAR (216) 18.3-20.5 kB,
# classicSR x2 and x4 (360) 31.7 kB, realDN UNet (144 at full resolution, in the decoder/refinement at
# 2 * dim) 12.4-14.1 kB, i.e. 85-98 bytes (about 24 float32 values) per channel of the SS2D's inner width
# d_inner: the four scan directions of x, dt and y, the gate and the in/out projections. 120 bytes
# (30 values) bounds each measurement by 22-43 %; the SR head's HR features are added on top (they peak
# after the body has freed).
BYTES_PER_INNER_CHANNEL = 120
# With SS2D's fused CPU scan (ops/scan/fused.py; what a CPU float32 forward runs where the C kernel builds)
# none of the four directions is copied: measured the same way, 18-30 bytes per inner channel (lightSR 21-26,
# colorDN 29, classicSR x2 18, realDN 30; classicSR x4 6, its head dominates). 34 bounds them by 13-85 %.
BYTES_PER_INNER_CHANNEL_FUSED = 34
# The pure-PyTorch scan's work buffers (a few groups of GROUP_ELEMS float32 values) do not grow with the
# tile; measured intercepts were 1-10 MB. 32 MiB covers them.
FIXED_BYTES = 32 << 20
# Share of the free memory a forward may plan to use: the CPU is shared with other programs; on CUDA the
# caching allocator fragments, and cuDNN wants workspace.
MEMORY_FRACTION = {'cpu': 0.5, 'cuda': 0.75}
MIN_AUTO_TILE = 32
TILE_MULTIPLE = 8  # the UNet pads to multiples of 8 internally: such tiles need no padding

ImageLike = Any  # a numpy array or a PIL.Image.Image (Pillow is optional)


class RestoreError(Exception):
    """A problem with the model, device or options that the user must fix (nothing was restored)."""


class ImageError(Exception):
    """One image could not be restored (unreadable, unsupported layout, out of memory, ...)."""


class OutOfMemory(ImageError):
    """The forward ran out of memory; ``suggested_tile`` (LQ pixels) should fit better."""

    def __init__(self, message: str, suggested_tile: int) -> None:
        super().__init__(message)
        self.suggested_tile = suggested_tile


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class RestoreModel:
    """A loaded network ready for :func:`restore`.

    Attributes:
        net: the network, in eval mode, float32 weights, on ``device``.
        arch_type: ``'MambaIR'`` or ``'MambaIRUNet'``.
        kwargs: its constructor arguments (``network_g`` without ``type``).
        scale: output size / input size (1 for denoising and JPEG artefact reduction).
        in_channels / out_channels: image channels the network takes / gives.
        device: where it runs.
        precision: ``'fp32'``, or ``'fp16'`` / ``'bf16'`` autocast (the selective scan stays float32).
        task: the preset named at loading (``task=...``), else None.
        presets: the official presets whose network has these parameters (e.g. all of ``CAR_10/30/40``), or none.
        source: where the weights came from.
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

    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) float32 in [0, 1] on ``device`` -> (B, out_channels, H*s, W*s) float32 (unclamped)."""
        dtype = PRECISIONS[self.precision]
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = self.net(lq)
        return out.float()  # blending and rounding in float32, whatever the autocast dtype

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
        return (f'{self.arch_type} ({config}), x{self.scale}, {self.in_channels}->{self.out_channels} channels, '
                f'{params / 1e6:.2f} M params, {self.device} {self.precision}')


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
        from .launch import OptionError, read_option_file

        try:
            opt = read_option_file(os.fspath(opt))
        except OptionError as exc:
            raise RestoreError(str(exc)) from None
    network = opt.get('network_g')
    if not isinstance(network, Mapping) or 'type' not in network:
        raise RestoreError('the options have no network_g with a type')
    scale = opt.get('scale')
    return dict(network), (int(scale) if scale is not None else None)


def _network_scale(arch_type: str, kwargs: Mapping[str, Any]) -> int:
    """Output size / input size of a network built from ``kwargs``."""
    if arch_type == 'MambaIR' and (kwargs.get('upsampler') or '') in ('pixelshuffle', 'pixelshuffledirect'):
        return int(kwargs.get('upscale', 2))
    return 1


def load_model(weights: str | os.PathLike | Mapping[str, torch.Tensor], task: str | None = None, *,
               opt: str | os.PathLike | Mapping[str, Any] | None = None, device: str | torch.device = 'auto',
               precision: str = 'fp32', param_key: str = 'params') -> RestoreModel:
    """Build the network of a checkpoint and load its weights.

    Args:
        weights: a checkpoint file (``torch.save`` of ``{'params': state_dict}``, ``{'params_ema': ...}`` or a
            bare state dict; read with ``weights_only=True``, so pickled code is refused), or such a dict.
        task: an official preset (``classicSR_x4``, ``lightSR_x2``, ``colorDN_25``, ``CAR_10``, ``realDN``, ...;
            see :data:`basicsr_mambair.presets.PRESETS`). The checkpoint must fit it exactly.
        opt: instead of ``task``: a BasicSR option file (or its dict); its ``network_g`` is built.
        device: ``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:N'``.
        precision: ``'fp32'``; ``'fp16'`` (CUDA only) or ``'bf16'`` run the network under autocast, with
            the selective scan kept in float32.
        param_key: the checkpoint entry holding the weights (falls back to ``params``, as BasicSR).

    Without ``task`` and ``opt`` the architecture and every parameter-shaping argument (arch family,
    embed_dim, depths, d_state, mlp_ratio, upsampler, upscale, channels, ...) are inferred from the
    state dict's keys and shapes. Arguments that leave no trace in the weights keep their defaults
    (``img_range`` 1.0, as in every official config); pass ``opt`` for a network trained otherwise.

    Raises:
        FileNotFoundError: no such checkpoint file.
        CheckpointError: unreadable or unsafe checkpoint, not a MambaIR/MambaIRUNet state dict (the message
            names the keys that disagree with the closest official preset), or weights not fitting ``task``/
            ``opt`` (the message names the config difference).
        RestoreError: bad ``task``/``opt``/``device``/``precision``.
    """
    from basicsr.utils.registry import ARCH_REGISTRY

    from .presets import get_preset
    from .utils.checkpoint import infer_config, load_checked, matching_presets, read_state_dict

    if task is not None and opt is not None:
        raise RestoreError('give either a task preset or an option file, not both')
    dev = resolve_device(device)
    _check_precision(precision, dev)

    if isinstance(weights, Mapping):  # a state dict, or a loaded checkpoint holding one under param_key
        inner = weights.get(param_key, weights.get('params'))
        state_dict, source = dict(inner if isinstance(inner, Mapping) else weights), 'the state dict'
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
        arch_type, kwargs = infer_config(state_dict, explain=True)
        network = {'type': arch_type, **kwargs}

    arch_type = network.pop('type')
    if arch_type not in SUPPORTED_ARCHS:
        raise RestoreError(f"network_g type {arch_type!r} is not supported (use {' or '.join(SUPPORTED_ARCHS)})")
    try:
        net = ARCH_REGISTRY.get(arch_type)(**network)
    except (TypeError, ValueError) as exc:  # e.g. a misspelt argument in an option file
        raise RestoreError(f'cannot build {arch_type} from network_g: {exc}') from None
    load_checked(net, state_dict, strict=True, source=source)
    net.eval().to(dev)
    for param in net.parameters():
        param.requires_grad_(False)

    scale = _network_scale(arch_type, network)
    if expected_scale is not None and expected_scale != scale:
        raise RestoreError(f'the options say scale {expected_scale}, but their network_g upscales by {scale}')
    if arch_type == 'MambaIR':
        in_channels = out_channels = int(network.get('in_chans', 3))
    else:
        in_channels, out_channels = int(network.get('inp_channels', 3)), int(network.get('out_channels', 3))
    try:
        presets = tuple(matching_presets(*infer_config(net.state_dict())))
    except Exception:  # noqa: BLE001  (a custom network from an option file: no preset, nothing to report)
        presets = ()
    return RestoreModel(net=net, arch_type=arch_type, kwargs=network, scale=scale, in_channels=in_channels,
                        out_channels=out_channels, device=dev, precision=precision, task=task, presets=presets,
                        source=source)


# ----------------------------------------------------------------------------------------------------------------
# Memory and tiles


def activation_bytes_per_pixel(arch_type: str, kwargs: Mapping[str, Any], fused_scan: bool = False) -> int:
    """Estimated peak activation memory of a float32 forward per LQ pixel (bytes); see ``BYTES_PER_INNER_CHANNEL``.

    MambaIR: ``120 * int(mlp_ratio * embed_dim)``, plus the HR head (pixelshuffle: 64 features, twice, per
    HR pixel). MambaIRUNet: ``120 * int(mlp_ratio * 2 * dim)`` (its full-resolution decoder) plus the
    encoder skip (``dim`` values). ``fused_scan``: SS2D runs the fused CPU kernel
    (:func:`~basicsr_mambair.ops.scan.uses_fused_kernel`), ``BYTES_PER_INNER_CHANNEL_FUSED`` instead of 120.
    """
    per_channel = BYTES_PER_INNER_CHANNEL_FUSED if fused_scan else BYTES_PER_INNER_CHANNEL
    if arch_type == 'MambaIR':
        d_inner = int(float(kwargs.get('mlp_ratio', 2.0)) * int(kwargs.get('embed_dim', 96)))
        scale = _network_scale(arch_type, kwargs)
        head_channels = {'pixelshuffle': 2 * 64, 'pixelshuffledirect': 2 * int(kwargs.get('in_chans', 3))}
        head = 4 * scale ** 2 * head_channels.get(kwargs.get('upsampler') or '', 0)
        return per_channel * d_inner + head
    dim = int(kwargs.get('dim', 48))
    return per_channel * int(float(kwargs.get('mlp_ratio', 2.0)) * 2 * dim) + 4 * dim


def measure_peak_bytes(net: nn.Module, channels: int, side: int) -> int:
    """Peak bytes allocated by the CPU allocator during one forward of a (1, channels, side, side) input.

    From ``torch.profiler`` memory events; calibrates :func:`activation_bytes_per_pixel` (see
    ``benchmarks/bench_memory.py`` and the tests).
    """
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(1, channels, side, side)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        net(x)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]')
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cgroup_available() -> int | None:
    """Bytes left under a cgroup-v2 memory limit (containers), or None where there is none."""
    try:
        with open('/sys/fs/cgroup/memory.max') as f:
            limit = f.read().strip()
        if limit == 'max':
            return None
        with open('/sys/fs/cgroup/memory.current') as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> int:
    """Bytes a forward on ``device`` can still get.

    CUDA: ``torch.cuda.mem_get_info`` free memory plus what PyTorch's cache holds unused. CPU:
    ``MemAvailable`` of ``/proc/meminfo`` (else ``os.sysconf`` free pages, else 4 GiB), capped by a
    cgroup-v2 limit.
    """
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = None
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (AttributeError, ValueError, OSError):
            available = 4 << 30
    limit = _cgroup_available()
    return min(available, limit) if limit is not None else available


def _image_bytes(model: RestoreModel, height: int, width: int) -> int:
    """Whole-image buffers around the network: the LQ tensor and its copies, the blended output and weights."""
    pixels = height * width
    return 4 * pixels * (2 * model.in_channels + 3 * (model.out_channels + 1) * model.scale ** 2)


def choose_tile(model: RestoreModel, height: int, width: int, overlap: int = 32,
                available: int | None = None) -> int:
    """The LQ tile side for an ``height`` x ``width`` image: 0 (whole image) if it fits, else the largest fitting one.

    Peak = ``FIXED_BYTES`` + whole-image buffers + tile pixels x :func:`activation_bytes_per_pixel`, to fit
    into ``MEMORY_FRACTION`` of ``available`` (default: :func:`available_memory`). Tiles are multiples of 8,
    at least ``max(32, 2 * overlap)``.
    """
    if available is None:
        available = available_memory(model.device)
    # the scan computes in float32 at every precision
    fused = uses_fused_kernel(model.device, torch.float32)
    per_pixel = activation_bytes_per_pixel(model.arch_type, model.kwargs, fused)
    budget = int(available * MEMORY_FRACTION.get(model.device.type, 0.5)) - FIXED_BYTES \
        - _image_bytes(model, height, width)
    if height * width * per_pixel <= budget:
        return 0
    side = math.isqrt(max(budget, 0) // per_pixel) // TILE_MULTIPLE * TILE_MULTIPLE
    return max(side, MIN_AUTO_TILE, 2 * overlap)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or 'out of memory' in text.lower())


def _forward(model: RestoreModel, lq: torch.Tensor, tile: int | str | None, overlap: int, tile_batch: int,
             progress: Callable[[int, int], None] | None) -> torch.Tensor:
    """(1, C, H, W) float32 in [0, 1] -> (1, C', H*s, W*s) float32, whole or tiled; OOM -> :class:`OutOfMemory`."""
    h, w = lq.shape[-2:]
    if tile == 'auto':
        tile = choose_tile(model, h, w, overlap)
    tile = int(tile or 0)
    if tile < 0:
        raise ImageError(f'tile must be >= 0 (0 = whole image), got {tile}')
    try:
        if tile == 0 or tile >= max(h, w):
            out = model(lq.to(model.device))
            if progress is not None:
                progress(1, 1)
        else:
            out = forward_tiled(model, lq.to(model.device), model.scale, tile, overlap, tile_batch, progress)
        return out.cpu()
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
        if model.device.type == 'cuda':
            torch.cuda.empty_cache()  # let the next image start from a clean cache
        used = tile if 0 < tile < max(h, w) else max(h, w)
        suggestion = max(TILE_MULTIPLE, used // 2 // TILE_MULTIPLE * TILE_MULTIPLE)
        what = f'with tile {tile}' if 0 < tile < max(h, w) else f'on the whole {w}x{h} image'
        raise OutOfMemory(f'out of memory on {model.device} {what}; try --tile {suggestion}', suggestion) from None


# ----------------------------------------------------------------------------------------------------------------
# Images


_PIL_DIRECT = ('L', 'LA', 'RGB', 'RGBA', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(image, Image.Image)


def _pil_to_array(image: Any) -> np.ndarray:
    """A PIL image as an RGB(A)/gray numpy array of its bit depth."""
    if image.mode not in _PIL_DIRECT:
        has_alpha = image.mode in ('PA', 'RGBa', 'La') or 'transparency' in image.info
        image = image.convert('RGBA' if has_alpha else 'RGB')
    array = np.asarray(image)
    if image.mode.startswith('I;16'):
        array = array.astype(np.uint16)  # native byte order (I;16B arrays are big-endian)
    return array


def _array_to_pil(array: np.ndarray) -> Any:
    from PIL import Image

    if array.dtype == np.float32 and array.ndim == 3:  # PIL has no float colour mode: 8 bits
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(array)


@dataclass
class _Prepared:
    """An image split for the network: colour in [0, 1] as the network wants it, alpha, and how to put it back."""

    colour: np.ndarray  # (H, W, in_channels) float32, RGB order
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1]
    dtype: np.dtype  # uint8 / uint16 / float32 of the result
    to_gray: bool  # the result is converted to one channel (gray input, colour network)
    squeeze: bool  # 2-D input: 2-D result when it has one channel
    bgr: bool


def _normalise(image: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0, np.dtype(np.uint8)  # as BasicSR's img2tensor
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0, np.dtype(np.uint16)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32), np.dtype(np.float32)
    raise ImageError(f'unsupported pixel type {image.dtype} (use uint8, uint16 or float in [0, 1])')


def _prepare(image: np.ndarray, in_channels: int, bgr: bool) -> _Prepared:
    import cv2

    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise ImageError(f'unsupported image shape {image.shape} (use (H, W) or (H, W, C) with C = 1, 2, 3 or 4)')
    if min(image.shape[:2]) < 1:
        raise ImageError(f'empty image {image.shape}')
    if in_channels not in (1, 3):
        raise ImageError(f'the network takes {in_channels}-channel inputs; only 1 (gray) and 3 (RGB) are '
                         'supported for images')
    squeeze = image.ndim == 2
    pixels, dtype = _normalise(image if image.ndim == 3 else image[..., None])
    channels = pixels.shape[2]
    alpha = pixels[..., -1].copy() if channels in (2, 4) else None
    colour = pixels[..., :3] if channels >= 3 else pixels[..., :1]
    if colour.shape[2] == 3 and bgr:
        colour = colour[..., ::-1]
    gray_input = colour.shape[2] == 1
    if in_channels == 1 and not gray_input:
        colour = cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_RGB2GRAY)[..., None]
    elif in_channels == 3 and gray_input:
        colour = np.repeat(colour, 3, axis=2)
    return _Prepared(colour=np.ascontiguousarray(colour), alpha=alpha, dtype=dtype,
                     to_gray=gray_input and in_channels == 3, squeeze=squeeze, bgr=bgr)


def _finish(colour: np.ndarray, prep: _Prepared, scale: int) -> np.ndarray:
    """Network-domain (h, w, C) float32 RGB -> the caller's layout, alpha (resized by ``scale``) and dtype."""
    import cv2

    colour = np.clip(colour, 0.0, 1.0)
    if prep.to_gray and colour.shape[2] == 3:
        colour = cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_RGB2GRAY)[..., None]
    if colour.shape[2] == 3 and prep.bgr:
        colour = colour[..., ::-1]
    parts = [colour]
    if prep.alpha is not None:
        alpha = prep.alpha
        if scale != 1:
            size = (colour.shape[1], colour.shape[0])
            alpha = np.clip(cv2.resize(alpha, size, interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
        parts.append(alpha[..., None])
    result = np.concatenate(parts, axis=2) if len(parts) > 1 else colour
    if prep.squeeze and result.shape[2] == 1:
        result = result[..., 0]
    if prep.dtype == np.uint8:
        return np.round(result * 255.0).astype(np.uint8)  # as BasicSR's tensor2img
    if prep.dtype == np.uint16:
        return np.round(result * 65535.0).astype(np.uint16)
    return np.ascontiguousarray(result, dtype=np.float32)


def _restore_array(model: RestoreModel, image: np.ndarray, *, tile: int | str | None = 'auto',
                   tile_overlap: int = 32, tile_batch: int = 1, bgr: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   with_input: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(restored image, the input as the network saw it in the result's layout, or None) of a numpy image."""
    prep = _prepare(image, model.in_channels, bgr)
    lq = torch.from_numpy(prep.colour.transpose(2, 0, 1).copy())[None]
    out = _forward(model, lq, tile, tile_overlap, tile_batch, progress)
    result = _finish(out[0].numpy().transpose(1, 2, 0), prep, model.scale)
    shown = _finish(prep.colour, prep, 1) if with_input else None
    return result, shown


def restore(model: RestoreModel, image: ImageLike, *, tile: int | str | None = 'auto', tile_overlap: int = 32,
            tile_batch: int = 1, bgr: bool = False, progress: Callable[[int, int], None] | None = None) -> ImageLike:
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

    Returns:
        The restored image, ``model.scale`` times larger, of the input's type (numpy / PIL), dtype and channel
        layout (float results are float32 in [0, 1]); see the module docstring for gray/colour conversion.

    Raises:
        ImageError: unsupported image layout or dtype; :class:`OutOfMemory` (with ``suggested_tile``) when the
            forward ran out of memory.
    """
    if _is_pil(image):
        result, _ = _restore_array(model, _pil_to_array(image), tile=tile, tile_overlap=tile_overlap,
                                   tile_batch=tile_batch, progress=progress)
        return _array_to_pil(result)
    if not isinstance(image, np.ndarray):
        raise ImageError(f'expected a numpy array or a PIL image, got {type(image).__name__}')
    result, _ = _restore_array(model, image, tile=tile, tile_overlap=tile_overlap, tile_batch=tile_batch,
                               bgr=bgr, progress=progress)
    return result
