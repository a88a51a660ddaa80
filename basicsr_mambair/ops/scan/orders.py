"""Scans over position-major inputs in several orders, composed of gathers, a flat scan and a scatter-add.

MambaIR's SS2D scans a feature map in four orders and MambaIRv2 its tokens in a sorted order; both hand
every order to a flat (batch, dim, L) selective scan. :func:`ordered_scan` states that computation once
in the position-major layout of the fused C kernel (:mod:`.fused`), which walks the orders in place: it
is the kernel's float64 reference (self-check, tests) and, with another flat scan, the fallback of
MambaIRv2's permuted scan on backends without the fused kernel.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .reference import selective_scan_reference

NUM_CROSS_DIRECTIONS = 4


def cross_positions(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """(4, H*W) int64: the grid position (row-major index) of step t of each of SS2D's four directions,
    in the order of its ``cross_scan``: row-major, column-major, reversed row-major, reversed column-major."""
    grid = torch.arange(height * width, device=device).view(height, width)
    rows, cols = grid.flatten(), grid.t().flatten()
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


def split_projection(proj: Tensor, rank: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """dt_low, B, C of a (..., R + 2N) projection (views)."""
    return proj[..., :rank], proj[..., rank:rank + n], proj[..., rank + n:]


def ordered_scan(u: Tensor, proj: Tensor, dt_weight: Tensor, dt_bias: Tensor | None, A: Tensor, D: Tensor | None,
                 positions: Tensor, c_add: Tensor | None = None, delta_softplus: bool = True,
                 scan: Callable[..., Tensor] = selective_scan_reference) -> Tensor:
    """K selective scans, each over the positions of one order, summed back onto the positions.

    Args:
        u: (batch, P, dim) input, position-major.
        proj: (batch, P, K, R + 2N): per position and direction, dt_low (R), B (N) and C (N).
        dt_weight: (K, dim, R): delta of direction k = dt_weight[k] @ dt_low (before bias and softplus).
        dt_bias: (K, dim) or None; A: (K * dim, N); D: (K * dim,) or None.
        positions: (K, L), (1, K, L) or (batch, K, L) int64: the position of step t of direction k.
        c_add: (batch, L, N) or None, added to C at step t (not position): MambaIRv2's prompt.
        delta_softplus: softplus on delta + bias.
        scan: a flat scan with the signature of ``selective_scan`` (default: the sequential reference).

    Returns:
        (batch, P, dim): the sum over the directions of their outputs (with D u), at their positions.
    """
    batch, _, dim = u.shape
    k_dirs, rank, n = proj.shape[2], dt_weight.shape[-1], A.shape[1]
    index = (positions if positions.dim() == 3 else positions[None]).expand(batch, -1, -1)  # (batch, K, L)
    length = index.shape[-1]
    flat = index.reshape(batch, k_dirs * length, 1)
    us = u.gather(1, flat.expand(-1, -1, dim)).view(batch, k_dirs, length, dim)
    rows = torch.stack([proj[:, :, k].gather(1, index[:, k, :, None].expand(-1, -1, proj.shape[-1]))
                        for k in range(k_dirs)], 1)  # (batch, K, L, R + 2N)
    dts, Bs, Cs = split_projection(rows, rank, n)
    if c_add is not None:
        Cs = Cs + c_add[:, None]
    delta = torch.einsum('bklr,kdr->bkdl', dts, dt_weight).reshape(batch, k_dirs * dim, length)
    y = scan(us.permute(0, 1, 3, 2).reshape(batch, k_dirs * dim, length), delta, A, Bs.transpose(-1, -2),
             Cs.transpose(-1, -2), D, delta_bias=None if dt_bias is None else dt_bias.reshape(-1),
             delta_softplus=delta_softplus)
    y = y.view(batch, k_dirs, dim, length).permute(0, 1, 3, 2).reshape(batch, k_dirs * length, dim)
    return u.new_zeros(batch, u.shape[1], dim, dtype=y.dtype).scatter_add(1, flat.expand(-1, -1, dim), y)


def check_permutation(perm: Tensor, length: int) -> None:
    """``perm`` (batch, L) must hold every position 0..L-1 once per row (one line naming the problem)."""
    if perm.dim() != 2 or perm.shape[1] != length or perm.dtype != torch.int64:
        raise ValueError(f'perm must be an int64 (batch, {length}) tensor; got {perm.dtype} {tuple(perm.shape)}')
    if perm.numel() and (perm.min() < 0 or perm.max() >= length):
        raise ValueError(f'perm holds positions outside [0, {length})')
    if not bool((torch.zeros_like(perm).scatter_add_(1, perm, torch.ones_like(perm)) == 1).all()):
        raise ValueError('perm is not a permutation of the positions (a position repeats) in some batch row')
