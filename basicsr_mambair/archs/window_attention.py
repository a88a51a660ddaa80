"""Shifted-window multi-head self-attention (Swin style) as used by MambaIRv2's AttentiveLayer (spec 2.2, 2.5).

Pieces: :func:`window_partition` / :func:`window_reverse` (feature map <-> non-overlapping square windows),
:func:`relative_position_index` (the index into the relative-position bias table, stored by MambaIRv2 as
the buffer ``relative_position_index_SA``), :func:`shifted_window_mask` (the -100 mask that keeps the
cyclically shifted windows from attending across the image border) and :class:`WindowAttention`, which
takes already projected q, k, v (the projection ``wqkv`` lives on the layer, as officially).

Windows are ordered row-major over the window grid, and positions row-major inside a window.
"""

from __future__ import annotations

import torch
from torch import nn

MASK_VALUE = -100.0  # the official mask value (not -inf): masked logits keep a tiny, nonzero weight


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws, ws, C); H and W must be multiples of ``window_size``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """(ws^2, ws^2) int64: entry (i, j) indexes the (2ws-1)^2 bias table by the offset of position i to j."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)  # (2, ws^2)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (ws^2, ws^2, 2), offsets in [-ws+1, ws-1]
    rel = rel + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window_size: int, shift_size: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Attention mask of the windows of an (h, w) map rolled by ``-shift_size``: (nW, ws^2, ws^2) float32.

    After the roll, a window on the last row/column of windows holds pixels from up to four image
    regions that are not neighbours; pairs from different regions get ``MASK_VALUE``, all others 0.
    """
    labels = torch.zeros(1, h, w, 1, device=device)
    bands = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in bands:
        for ws in bands:
            labels[:, hs, ws, :] = label
            label += 1
    win = window_partition(labels, window_size).reshape(-1, window_size * window_size)  # (nW, ws^2)
    differ = win[:, None, :] != win[:, :, None]
    return torch.zeros(differ.shape, device=device).masked_fill_(differ, MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias.

    Args:
        dim: channels C (split into ``num_heads`` heads of C / num_heads).
        window_size: side of the square window (an int or an official (ws, ws) pair).
        num_heads: number of heads.
        qkv_bias: recorded only (the qkv projection is the layer's ``wqkv``).

    Keys: ``relative_position_bias_table`` ((2ws-1)^2, heads), ``proj.{weight,bias}``.
    """

    def __init__(self, dim: int, window_size: int | tuple[int, int], num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f'window attention splits {dim} channels into {num_heads} heads: embed_dim must be a '
                             f'multiple of num_heads')
        ws = window_size if isinstance(window_size, int) else window_size[0]
        self.dim = dim
        self.window_size = ws
        self.num_heads = num_heads
        self.qkv_bias = qkv_bias
        self.scale = (dim // num_heads) ** -0.5
        # A raw parameter: the model-level Linear/LayerNorm init does not touch it.
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * ws - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, qkv: torch.Tensor, rpi: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            qkv: (B * nW, n, 3C) projected tokens of each window (n = ws^2; q, k, v concatenated, head-major).
            rpi: (n, n) relative position index (:func:`relative_position_index`).
            mask: (nW, n, n) additive mask (:func:`shifted_window_mask`) for shifted windows, else None.

        Returns:
            (B * nW, n, C).
        """
        b_, n, c3 = qkv.shape
        c = c3 // 3
        q, k, v = qkv.reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B * nW, heads, n, n)
        # In-place adds (the same values as the official out-of-place ones): the (B * nW, heads, n, n)
        # scores are the largest tensor of the network, one copy less is faster and saves memory.
        bias = self.relative_position_bias_table[rpi.reshape(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn += bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn.view(b_ // nw, nw, self.num_heads, n, n).add_(mask.to(attn.dtype)[None, :, None])
        attn = self.softmax(attn)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}'
