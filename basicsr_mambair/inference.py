"""Whole-image, tiled and self-ensemble inference for any restoration network.

All functions take LQ tensors (B, C, H, W) and return (B, C, H*scale, W*scale) on the input's
device; the network runs under whatever grad mode the caller chose.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``min(tile, length)`` covering ``[0, length)``, the last flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(size: int, overlap: int, fade_in: bool, fade_out: bool, device, dtype) -> torch.Tensor:
    """1-D blending weights of a tile along one axis (length ``size``, overlap ``overlap``, output pixels).

    Towards an edge shared with a neighbour tile the weight falls to zero: the outer half of the
    overlap gets weight 0 (the pixels a tile computes worst, missing context beyond its edge), the
    inner half a raised-cosine rise to 1. Neighbours' non-zero regions still overlap, since tiles
    advance by at most ``tile - overlap``, so every pixel has weight.
    """
    pos = torch.arange(size, device=device, dtype=dtype) + 0.5  # pixel centres
    w = torch.ones(size, device=device, dtype=dtype)
    if overlap <= 0:
        return w
    margin = overlap / 2

    def rise(distance: torch.Tensor) -> torch.Tensor:
        t = ((distance - margin) / (overlap - margin)).clamp(0, 1)
        return 0.5 - 0.5 * torch.cos(math.pi * t)

    if fade_in:
        w = torch.minimum(w, rise(pos))
    if fade_out:
        w = torch.minimum(w, rise(size - pos))
    return w


@torch.no_grad()
def forward_tiled(net: Forward, lq: torch.Tensor, scale: int, tile: int, overlap: int = 32,
                  tile_batch: int = 1, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run ``net`` on overlapping ``tile`` x ``tile`` LQ tiles and blend them smoothly (no seams).

    Memory for the network is that of ``tile_batch`` tiles, whatever the image size. A tile at
    least as large as the image gives exactly the whole-image output. ``progress(done, total)`` is
    called after each network call with the number of tiles finished so far and in all.
    """
    b, c, h, w = lq.shape
    overlap = max(0, min(overlap, tile - 1))
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    boxes = [(y, x) for y in ys for x in xs]
    out = acc = None
    for first in range(0, len(boxes), tile_batch):
        group = boxes[first:first + tile_batch]
        crops = torch.cat([lq[..., y:y + th, x:x + tw] for y, x in group], dim=0)
        results = net(crops)
        if out is None:
            out_c = results.shape[1]
            out = lq.new_zeros(b, out_c, h * scale, w * scale, dtype=results.dtype)
            acc = lq.new_zeros(1, 1, h * scale, w * scale, dtype=results.dtype)
        for k, (y, x) in enumerate(group):
            wy = _ramp(th * scale, overlap * scale, y > 0, y + th < h, results.device, results.dtype)
            wx = _ramp(tw * scale, overlap * scale, x > 0, x + tw < w, results.device, results.dtype)
            weight = wy[:, None] * wx[None, :]
            region = (..., slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            out[region] += results[k * b:(k + 1) * b] * weight
            acc[region] += weight
        if progress is not None:
            progress(first + len(group), len(boxes))
    return out / acc


@torch.no_grad()
def forward_official_tiles(net: Forward, lq: torch.Tensor, scale: int) -> torch.Tensor:
    """The official ``MambaIRModel.test`` tiling, for reproducing published numbers exactly.

    Tiles per axis = side // 200 + 1; reflect-pad so the side divides evenly; each tile is extended
    by 10 % of its size into its neighbours, run separately, and its core is pasted back (hard
    seams); the padding is cropped at the end.
    """
    _, _, h, w = lq.shape
    nh, nw = h // 200 + 1, w // 200 + 1
    pad_h, pad_w = (-h) % nh, (-w) % nw
    img = F.pad(lq, (0, pad_w, 0, pad_h), 'reflect') if pad_h or pad_w else lq
    big_h, big_w = img.shape[-2:]
    sh, sw = big_h // nh, big_w // nw
    shave_h, shave_w = sh // 10, sw // 10
    out = None
    for i in range(nh):
        top = i * sh - (shave_h if i > 0 else 0)
        bottom = (i + 1) * sh + (shave_h if i < nh - 1 else 0)
        for j in range(nw):
            left = j * sw - (shave_w if j > 0 else 0)
            right = (j + 1) * sw + (shave_w if j < nw - 1 else 0)
            res = net(img[..., top:bottom, left:right])
            if out is None:
                out = res.new_zeros(res.shape[0], res.shape[1], big_h * scale, big_w * scale)
            oy = (shave_h if i > 0 else 0) * scale
            ox = (shave_w if j > 0 else 0) * scale
            out[..., i * sh * scale:(i + 1) * sh * scale, j * sw * scale:(j + 1) * sw * scale] = \
                res[..., oy:oy + sh * scale, ox:ox + sw * scale]
    return out[..., :h * scale, :w * scale]


def _dihedral(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """The k-th of the 8 flips/rotations of the (H, W) plane (k in 0..7), or its inverse."""
    flip, rot = k >= 4, k % 4
    if not inverse:
        x = x.flip(-1) if flip else x
        return torch.rot90(x, rot, dims=(-2, -1))
    x = torch.rot90(x, -rot, dims=(-2, -1))
    return x.flip(-1) if flip else x


@torch.no_grad()
def forward_self_ensemble(forward: Forward, lq: torch.Tensor) -> torch.Tensor:
    """x8 self-ensemble: the mean of ``forward`` over the 8 dihedral transforms, each transformed back."""
    total = None
    for k in range(8):
        out = _dihedral(forward(_dihedral(lq, k)), k, inverse=True)
        total = out if total is None else total + out
    return total / 8


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (..., H, W) at the bottom/right to multiples of ``multiple`` by reflection (crop the result back).

    Reflection needs the pad to be smaller than the side; tiny sides are padded by edge replication. During
    ``torch.onnx.export`` the pad is always applied (maybe by 0) and reflects: the graph then pads any size,
    from the shapes it is given at run time (sides of at least ``multiple // 2 + 1`` pixels).
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if torch.onnx.is_in_onnx_export():
        return F.pad(x, (0, pad_w, 0, pad_h), mode='reflect')
    if pad_h == 0 and pad_w == 0:
        return x
    mode = 'reflect' if pad_h < h and pad_w < w else 'replicate'
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
