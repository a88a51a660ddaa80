"""Array helpers the archs share: token/map reshapes, padding to a size multiple, autocast control.

BasicSR's own ``basicsr.archs.arch_util`` has none of these (its ``to_2tuple`` etc. we do not need).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F


def tokens_to_map(x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
    """(B, H*W, C) row-major tokens -> (B, C, H, W), a channels-last view of contiguous tokens.

    Built as (B, H, W, C) permuted, so that its strides are the canonical channels-last ones also for B = 1
    (``transpose(1, 2).reshape(...)`` gives batch stride C there, and PyTorch's convolutions then take
    the map for NCHW and return NCHW, which every later token view has to copy back).
    """
    return x.reshape(x.shape[0], x_size[0], x_size[1], x.shape[2]).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C) row-major tokens (a view)."""
    return x.flatten(2).transpose(1, 2)


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


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast is off for ``device_type`` (a no-op where autocast does not exist there).

    The selective scan always runs in float32: exp(dt * A) and the long recurrence lose too much in 16 bits.
    """
    is_available = getattr(torch.amp, 'is_autocast_available', None)
    if is_available is not None and not is_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
