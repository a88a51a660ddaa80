"""Channel attention (RCAN style) and the convolutional branch ``CAB`` of every MambaIR block.

Parameter names and shapes follow the official code so that checkpoints load with strict=True:
``ChannelAttention`` keys ``attention.1.*`` / ``attention.3.*``; ``CAB`` keys ``cab.{i}.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import is_tracing, linear


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution (stride 1, no groups) as a matmul over the channels: (B, C, H, W) -> (B, C', H, W).

    Why not ``conv(x)``: on the CPU PyTorch sends 1x1 kernels on channels-last input to its slow generic
    convolution, and a matmul on the (B, H, W, C) view is both faster and keeps the channels-last layout
    every MambaIR block works in (the result is a channels-last view too).
    """
    return linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)


def _is_pointwise(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0) and layer.groups == 1)


def min_channels(is_light_sr: bool = False, compress_ratio: int = 3, squeeze_factor: int = 30) -> int:
    """The fewest channels a :class:`CAB` works with: every hidden width (``C // squeeze_factor`` of the channel
    attention, ``C // compress_ratio`` or ``C // 2`` of the convolutions) must be at least 1."""
    return max(squeeze_factor, 2 if is_light_sr else compress_ratio)


def _check_width(num_feat: int, divisor: int, what: str) -> int:
    hidden = num_feat // divisor
    if hidden < 1:  # a zero-width layer builds, then fails on every image with a cryptic shape error
        raise ValueError(f'{what} divides the {num_feat} channels by {divisor}: needs at least {divisor} channels '
                         f'(raise embed_dim / dim to >= {divisor})')
    return hidden


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W2 relu(W1 avgpool(x)))``.

    Args:
        num_feat: channels C.
        squeeze_factor: hidden width is ``C // squeeze_factor``.
    """

    def __init__(self, num_feat: int, squeeze_factor: int = 16) -> None:
        super().__init__()
        hidden = _check_width(num_feat, squeeze_factor, 'the channel attention')
        # Indices 0..4 are part of the checkpoint key names (attention.1 / attention.3).
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_feat, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W) (in x's memory layout)."""
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel-attention block: the local (convolutional) branch of a VSSBlock.

    Two variants, selected by ``is_light_sr``:

    * classic (SR / DN / CAR / UNet): conv3x3 C->C/compress_ratio, GELU, conv3x3 ->C, channel attention.
    * light (light SR, the Oct-2024 code the current light weights belong to): ``compress_ratio`` is forced
      to 2 and the branch is conv1x1 C->C/2, depthwise conv3x3, GELU, conv1x1 ->C, dilated (2) depthwise
      conv3x3, channel attention -- a large receptive field for few parameters.

    Args:
        num_feat: channels C.
        is_light_sr: choose the light variant.
        compress_ratio: hidden width divisor of the classic variant.
        squeeze_factor: channel-attention squeeze factor.
    """

    def __init__(self, num_feat: int, is_light_sr: bool = False, compress_ratio: int = 3,
                 squeeze_factor: int = 30) -> None:
        super().__init__()
        if is_light_sr:
            hidden = _check_width(num_feat, 2, 'the light channel-attention block')
            self.cab = nn.Sequential(
                nn.Conv2d(num_feat, hidden, 1),
                nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
                nn.GELU(),
                nn.Conv2d(hidden, num_feat, 1),
                nn.Conv2d(num_feat, num_feat, 3, padding=2, dilation=2, groups=num_feat),
                ChannelAttention(num_feat, squeeze_factor),
            )
        else:
            hidden = _check_width(num_feat, compress_ratio, 'the channel-attention block')
            self.cab = nn.Sequential(
                nn.Conv2d(num_feat, hidden, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(hidden, num_feat, 3, padding=1),
                ChannelAttention(num_feat, squeeze_factor),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W); best as a channels-last view, which the result is too."""
        as_matmul = x.device.type == 'cpu' and not is_tracing()  # see conv1x1
        for layer in self.cab:
            x = conv1x1(layer, x) if as_matmul and _is_pointwise(layer) else layer(x)
        return x
