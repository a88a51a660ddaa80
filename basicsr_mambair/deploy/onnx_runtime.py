"""Running exported graphs with ONNX Runtime: :class:`OnnxModel` (input checked against the graph) and the
export check :func:`check_against_torch` (ONNX Runtime vs PyTorch on a real image)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CheckFailed, ExportError, ImageError

METADATA_PREFIX = 'mambair.'  # metadata_props written by the export: arch, scale, channels, ...

__all__ = ['CheckResult', 'OnnxModel', 'check_against_torch', 'default_tolerance']

PROVIDERS = {'cpu': ['CPUExecutionProvider'], 'cuda': ['CUDAExecutionProvider', 'CPUExecutionProvider']}
TOLERANCE = {'fp32': 1e-4, 'fp16': 1e-2}


def default_tolerance(precision: str) -> float:
    """Largest absolute difference to PyTorch's float32 output an exported graph may show (outputs in [0, 1])."""
    return TOLERANCE[precision]


class OnnxModel:
    """An exported graph in an ONNX Runtime session; calling it checks the input against what the graph takes.

    Args:
        model: a ``.onnx`` path or the serialized model.
        provider: ``'cpu'`` or ``'cuda'`` (ONNX Runtime's CUDA provider must be installed: onnxruntime-gpu).
        threads: intra-op threads; default: torch's thread count (``OMP_NUM_THREADS``).
    """

    def __init__(self, model: str | os.PathLike | bytes, provider: str = 'cpu', threads: int | None = None) -> None:
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise ExportError(f"unknown provider {provider!r} (use {', '.join(PROVIDERS)})")
        if PROVIDERS[provider][0] not in ort.get_available_providers():
            raise ExportError(f'ONNX Runtime has no {PROVIDERS[provider][0]} here (install onnxruntime-gpu for '
                              'cuda)')
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only: no notes on the loop bodies' unused outer values
        source = model if isinstance(model, bytes) else os.fspath(model)
        self.session = ort.InferenceSession(source, options, providers=PROVIDERS[provider])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len(METADATA_PREFIX):]: v for k, v in meta.items() if k.startswith(METADATA_PREFIX)}
        self.input = self.session.get_inputs()[0]
        self.min_side = int(self.metadata.get('min_side', 1))

    @property
    def static_size(self) -> tuple[int, int] | None:
        """(H, W) of a graph exported for one size, None for a dynamic one."""
        h, w = self.input.shape[2:]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """ExportError (one line) if the graph cannot take an input of ``shape`` (batch, C, H, W)."""
        batch, channels = self.input.shape[:2]
        if len(shape) != 4:
            raise ExportError(f'the graph takes (batch, {channels}, H, W) inputs, got shape {tuple(shape)}')
        if isinstance(batch, int) and shape[0] != batch:
            raise ExportError(f'the graph takes batches of {batch}, got {shape[0]}')
        if isinstance(channels, int) and shape[1] != channels:
            raise ExportError(f'the graph takes {channels}-channel inputs, got {shape[1]} channels')
        size = self.static_size
        if size is not None and tuple(shape[2:]) != size:
            raise ExportError(f'the graph was exported for {size[0]}x{size[1]} inputs, got {shape[2]}x{shape[3]} '
                              f'(export with --size {shape[2]}x{shape[3]} or --dynamic)')
        if min(shape[2:]) < self.min_side:
            raise ExportError(f'the graph takes inputs of at least {self.min_side}x{self.min_side} pixels, got '
                              f'{shape[2]}x{shape[3]}')

    def __call__(self, lq: np.ndarray) -> np.ndarray:
        """(batch, C, H, W) float32 in [0, 1] -> (batch, C, s*H, s*W) float32."""
        lq = np.ascontiguousarray(lq, dtype=np.float32)
        self.check_shape(lq.shape)
        return self.session.run(None, {self.input.name: lq})[0]


@dataclass
class CheckResult:
    """ONNX Runtime against PyTorch on one image: the largest absolute output difference and the timings."""

    image: str
    height: int
    width: int
    max_abs_diff: float
    tolerance: float
    onnx_seconds: float
    torch_seconds: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        verdict = 'ok' if self.passed else 'FAILED'
        return (f'check {verdict}: max |onnxruntime - pytorch| = {self.max_abs_diff:.2e} (tolerance '
                f'{self.tolerance:.0e}) on {os.path.basename(self.image)} {self.height}x{self.width}; '
                f'onnxruntime {self.onnx_seconds:.2f} s, pytorch {self.torch_seconds:.2f} s')


def _network_input(image_path: str | os.PathLike, in_channels: int) -> np.ndarray:
    """(1, C, H, W) float32 in [0, 1] of an image file, converted as ``mambair-restore`` converts it."""
    from ..image_convert import prepare
    from ..image_io import read_image

    try:
        prepared = prepare(read_image(os.fspath(image_path)), in_channels, bgr=True)
    except ImageError as exc:
        raise ExportError(f'{exc} ({image_path})') from None
    return prepared.colour.transpose(2, 0, 1)[None].copy()


def _center_crop(x: np.ndarray, size: tuple[int, int], image: str) -> np.ndarray:
    h, w = x.shape[2:]
    if h < size[0] or w < size[1]:
        raise ExportError(f'the check image is {h}x{w}, smaller than the exported size {size[0]}x{size[1]} ({image})')
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return np.ascontiguousarray(x[:, :, top:top + size[0], left:left + size[1]])


def check_against_torch(onnx_model: str | os.PathLike | bytes, model: Any, image: str | os.PathLike,
                        tolerance: float | None = None, provider: str = 'cpu') -> CheckResult:
    """Run an exported graph with ONNX Runtime on a real image and compare with the PyTorch network.

    Args:
        onnx_model: the ``.onnx`` file or serialized model.
        model: the PyTorch side, a :class:`~basicsr_mambair.api.RestoreModel` (float32).
        image: an image file; center-cropped to the graph's size when the graph is static.
        tolerance: largest allowed absolute difference (default :func:`default_tolerance` of the graph's precision).
        provider: ``'cpu'`` or ``'cuda'``.

    Raises:
        CheckFailed: the difference exceeds ``tolerance`` (or an output is not finite).
        ExportError: unreadable image, or one the graph cannot take (the message says why).
    """
    runner = OnnxModel(onnx_model, provider=provider)
    if tolerance is None:
        tolerance = default_tolerance(runner.metadata.get('precision', 'fp32'))
    x = _network_input(image, model.in_channels)
    if runner.static_size is not None:
        x = _center_crop(x, runner.static_size, os.fspath(image))
    runner.check_shape(x.shape)
    start = time.perf_counter()
    got = runner(x)
    onnx_seconds = time.perf_counter() - start
    start = time.perf_counter()
    expected = model(torch.from_numpy(x).to(model.device)).cpu().numpy()
    torch_seconds = time.perf_counter() - start
    if got.shape != expected.shape:
        raise CheckFailed(f'onnxruntime output shape {got.shape} differs from PyTorch {expected.shape}')
    diff = float(np.abs(got.astype(np.float64) - expected).max()) if np.isfinite(got).all() else float('inf')
    result = CheckResult(image=os.fspath(image), height=x.shape[2], width=x.shape[3], max_abs_diff=diff,
                         tolerance=tolerance, onnx_seconds=onnx_seconds, torch_seconds=torch_seconds)
    if not result.passed:
        failure = CheckFailed(result.describe())
        failure.result = result
        raise failure
    return result
