"""``F.linear`` for CPU float32 inference through oneDNN's matmul, which PyTorch ships but only its compiler uses.

Why: at MambaIR's projection shapes (a few thousand tokens by 60-360 channels, one thread) PyTorch's
``F.linear`` (MKL's sgemm) reaches 50-80 GFLOP/s on our CPU and oneDNN's matmul 65-100; the projections are a
third of a MambaIR forward. The op, ``torch.ops.mkldnn._linear_pointwise``, is internal to PyTorch (what
``torch.compile`` emits on a CPU), so it is used only where it exists and agrees with ``F.linear`` on a
small case (checked once), and only without autograd, autocast, ONNX export or ``torch.compile``; everything
else runs ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['is_tracing', 'linear', 'onednn_available']

_available: bool | None = None
_is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', lambda: False)  # torch >= 2.3


def onednn_available() -> bool:
    """Whether oneDNN's matmul exists here and agrees with ``F.linear`` (checked on the first call)."""
    global _available
    if _available is None:
        try:
            op = torch.ops.mkldnn._linear_pointwise
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(*shape, generator=g) for shape in ((3, 5, 40), (24, 40), (24,)))
            with torch.no_grad():
                _available = bool(torch.backends.mkldnn.is_available() and torch.allclose(
                    op(x, w, b, 'none', [], ''), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
        except (AttributeError, RuntimeError, TypeError):  # absent, or another signature
            _available = False
    return _available


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # PyTorch before 2.4
        return torch.is_autocast_cpu_enabled()


def is_tracing() -> bool:
    """Whether ``torch.onnx.export`` or ``torch.compile`` is recording a graph: CPU-speed rewrites then give way
    to the standard ops (which those graphs know how to express)."""
    return torch.onnx.is_in_onnx_export() or _is_compiling()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; on CPU float32 tensors without autograd or autocast, by oneDNN."""
    if (x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not _cpu_autocast() and not is_tracing() and onednn_available()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')
    return F.linear(x, weight, bias)
