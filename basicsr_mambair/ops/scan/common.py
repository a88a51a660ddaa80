"""What every scan backend shares: shape checks, the computation dtype, and finishing with D and the gate.

Shapes follow ``mamba_ssm``'s ``selective_scan_fn``: u, delta (batch, dim, L); A (dim, N); B, C
(batch, G, N, L) with dim divisible by G (channel block k uses group k), or (batch, N, L) for all channels.
"""

from __future__ import annotations

from typing import Callable, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import KernelUnavailable

ScanOut = Union[Tensor, Tuple[Tensor, Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) is scanned in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> int:
    """Validate shapes; return the number of groups G of B/C."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f'u and delta must both be (batch, dim, L); got {tuple(u.shape)}, {tuple(delta.shape)}')
    batch, dim, length = u.shape
    if A.is_complex():
        raise NotImplementedError('complex A is not supported (MambaIR uses a real A)')
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f'A must be (dim, N) = ({dim}, N); got {tuple(A.shape)}')
    n = A.shape[1]
    for name, t in (('B', B), ('C', C)):
        ok = (t.dim() == 3 and tuple(t.shape) == (batch, n, length)) or (
            t.dim() == 4 and t.shape[0] == batch and tuple(t.shape[2:]) == (n, length) and dim % t.shape[1] == 0)
        if not ok:
            raise ValueError(f'{name} must be (batch, N, L) or (batch, G, N, L) with dim % G == 0 for u '
                             f'{tuple(u.shape)} and N={n}; got {tuple(t.shape)}')
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f'B and C have different group counts: {B.shape[1]} vs {C.shape[1]}')
    return B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)


def grouped(t: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """B or C as (batch, G, N, L) in ``dtype`` (a view when possible; (batch, N, L) is shared by all G)."""
    return (t.unsqueeze(1) if t.dim() == 3 else t).to(dtype).expand(-1, groups, -1, -1)


def needs_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd must record an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype,
           inplace: bool = False) -> Tensor:
    """y + D u, times silu(z), in ``out_dtype``; ``inplace`` (y is ours, no autograd) saves two copies."""
    if D is not None:
        y = y.addcmul_(u, D.to(y.dtype)[:, None]) if inplace else y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y.mul_(F.silu(z.to(y.dtype))) if inplace else y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def unavailable_reason(load: Callable[[], object]) -> str | None:
    """Why a backend's ``load()`` fails (its :class:`KernelUnavailable` message), or None when it succeeds."""
    try:
        load()
    except KernelUnavailable as exc:
        return str(exc)
    return None
