"""VSSBlock: the residual state-space block shared by MambaIR and MambaIRUNet (spec 1.4).

``x = x * skip_scale  + DropPath(SS2D(LN(x)))``   (global branch, channels-last)
``x = x * skip_scale2 + CAB(LN(x))``             (local branch, convolutions)

Keys: ``ln_1.*``, ``self_attention.*`` (SS2D), ``skip_scale``, ``conv_blk.cab.*``, ``ln_2.*``, ``skip_scale2``.
The UNet's official VSSBlock is this block with ``is_light_sr=False``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..ops.linear import is_tracing
from .channel_attention import CAB
from .drop_path import DropPath
from .ss2d import SS2D


def _scaled_skip(branch: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * scale + branch``: in one pass (addcmul), except in ONNX / compile graphs (torch's ONNX addcmul
    computes fp16 networks in float32)."""
    return x * scale + branch if is_tracing() else torch.addcmul(branch, x, scale)


class VSSBlock(nn.Module):
    """Visual state-space block on a token sequence of an H x W feature map.

    Args:
        hidden_dim: channels C.
        drop_path: stochastic-depth probability of the SS2D branch.
        norm_layer: norm of the SS2D branch. The official signature defaults to LayerNorm(eps=1e-6), but
            every official caller passes ``nn.LayerNorm`` (eps 1e-5), which is therefore our default.
        attn_drop_rate: dropout at the SS2D output.
        d_state: SSM state size N.
        expand: SS2D expansion (``mlp_ratio`` of the networks).
        is_light_sr: use the light CAB variant (light SR only).
        **kwargs: passed on to :class:`SS2D` (which ignores unknown ones, e.g. ``input_resolution``).
    """

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 attn_drop_rate: float = 0.0, d_state: int = 16, expand: float = 2.0, is_light_sr: bool = False,
                 **kwargs) -> None:
        super().__init__()
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = SS2D(d_model=hidden_dim, d_state=d_state, expand=expand, dropout=attn_drop_rate,
                                   **kwargs)
        self.drop_path = DropPath(drop_path)
        self.skip_scale = nn.Parameter(torch.ones(hidden_dim))
        self.conv_blk = CAB(hidden_dim, is_light_sr)
        self.ln_2 = nn.LayerNorm(hidden_dim)
        self.skip_scale2 = nn.Parameter(torch.ones(hidden_dim))

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        """x: (B, H*W, C) tokens in row-major order; x_size: (H, W). Returns (B, H*W, C)."""
        b, length, c = x.shape
        x = x.reshape(b, x_size[0], x_size[1], c)  # (B, H, W, C)
        # One layout through the block: channels-last.
        x = _scaled_skip(self.drop_path(self.self_attention(self.ln_1(x))), x, self.skip_scale)
        # The convolutions run on an NCHW *view* of the channels-last tensor and return one (no copy).
        local = self.conv_blk(self.ln_2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = _scaled_skip(local, x, self.skip_scale2)
        return x.reshape(b, length, c)
