"""Selective scan (placeholder: a plain sequential float32 loop; replaced by the chunked scan)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Semantics of ``mamba_ssm.selective_scan_fn``. u, delta: (b, d, L); A: (d, N);
    B, C: (b, G, N, L) or (b, N, L); D, delta_bias: (d,); z: (b, d, L)."""
    dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    g = B.shape[1]
    B = B.repeat_interleave(d // g, dim=1)  # (b, d, N, L)
    C = C.repeat_interleave(d // g, dim=1)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h) if return_last_state else y
