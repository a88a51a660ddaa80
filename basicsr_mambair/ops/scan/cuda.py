"""The ``cuda`` scan: ``mamba_ssm``'s CUDA kernel, imported lazily the first time CUDA tensors are scanned.

``mamba_ssm`` is an optional dependency (extra ``cuda``) that only builds with a CUDA toolchain; importing
this package never imports it, and a failed import is remembered (tried once) and reported in one line.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ...errors import KernelUnavailable
from . import common
from .common import ScanOut

__all__ = ['load', 'reset', 'scan', 'unavailable_reason']

_fn: Callable | None = None
_error: KernelUnavailable | None = None


def load() -> Callable:
    """``mamba_ssm``'s ``selective_scan_fn``; raises :class:`KernelUnavailable` when it does not import."""
    global _fn, _error
    if _fn is None and _error is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception as exc:  # ImportError, or a broken build (OSError / undefined CUDA symbols)
            _error = KernelUnavailable(f'mamba_ssm does not import ({exc!r})')
        else:
            _fn = selective_scan_fn
    if _error is not None:
        raise _error
    return _fn


def unavailable_reason() -> str | None:
    """Why ``mamba_ssm`` cannot be used (one line), or None when it imports."""
    return common.unavailable_reason(load)


def reset() -> None:
    """Forget the import attempt (for tests)."""
    global _fn, _error
    _fn = _error = None


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
         return_last_state: bool = False) -> ScanOut:
    """``selective_scan_fn`` itself (same signature and semantics; CUDA tensors)."""
    return load()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
