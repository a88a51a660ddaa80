"""The ``reference`` scan: a plain sequential loop with autograd through it (the definition; tests and benchmarks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import ScanOut, check_shapes, compute_dtype, finish, grouped


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None,
                             delta_softplus: bool = False, return_last_state: bool = False) -> ScanOut:
    """Plain sequential scan, one time step per iteration (shapes as :func:`~basicsr_mambair.ops.scan.selective_scan`).

    Autograd runs through the loop, so training memory is O(batch * dim * N * L). Slow; for tests and
    benchmarks. Computes in float32, or float64 for float64 inputs.
    """
    groups = check_shapes(u, delta, A, B, C)
    out_dtype, cd = u.dtype, compute_dtype(u.dtype)
    dt = delta.to(cd)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cd)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)  # threshold 20, as in mamba_ssm's kernel
    u, A, B, C = u.to(cd), A.to(cd), grouped(B, groups, cd), grouped(C, groups, cd)
    batch, dim, length = u.shape
    n = B.shape[2]
    x = (dt * u).view(batch, groups, dim // groups, length)
    dt4 = dt.view(batch, groups, dim // groups, length)
    A4 = A.view(groups, dim // groups, n)
    h = u.new_zeros(batch, groups, dim // groups, n)
    ys = []
    for t in range(length):
        h = torch.exp(dt4[..., t, None] * A4) * h + x[..., t, None] * B[:, :, None, :, t]
        ys.append((h * C[:, :, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, length)
    out = finish(y, u, D, z, out_dtype)
    return (out, h.reshape(batch, dim, n)) if return_last_state else out
