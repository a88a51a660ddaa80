"""The reconstruction heads MambaIR and MambaIRv2 share (spec 1 and 2.2), under the official attribute names.

Both networks compute ``f = conv_after_body(body(conv_first(x))) + conv_first(x)`` on the normalised input x
and end with one of these heads (``upsampler``):

    ``'pixelshuffle'``        classic SR: ``conv_before_upsample`` (conv C->64, LeakyReLU(0.01)), ``upsample``
                              ((conv, PixelShuffle(2)) x log2(s), or one x3 step), ``conv_last`` 64->out.
    ``'pixelshuffledirect'``  light SR: ``upsample`` = one conv C -> s^2 * out and a PixelShuffle(s).
    ``'nearest+conv'``        real-world SR, x4 only (SwinIR / Real-ESRGAN style, fewer checkerboard artefacts
                              under a GAN loss): ``conv_before_upsample``, then twice nearest x2 + conv 64->64
                              (``conv_up1``, ``conv_up2``) + LeakyReLU(0.2), ``conv_hr`` + LeakyReLU(0.2),
                              ``conv_last`` 64->out.
    anything else (``''``)    denoising / JPEG CAR (upscale 1): ``out = x + conv_last(f)``.

The modules are attributes of the network itself (not of a sub-module), so the state-dict keys are the
official top-level ones (``conv_before_upsample.0.weight``, ``upsample.0.weight``, ``conv_up1.weight``, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_FEAT = 64  # width of the classic-SR and real-SR reconstruction heads
SR_UPSAMPLERS = ('pixelshuffle', 'pixelshuffledirect', 'nearest+conv')


class Upsample(nn.Sequential):
    """Classic-SR upsampler on 64 channels: (conv3x3 ->4C, PixelShuffle(2)) per factor 2, or one x3 step.

    Keys ``{0, 2, 4, ...}.weight/bias``. Scale 1 gives an empty (identity) module, as officially.
    """

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list[nn.Module] = []
        if scale >= 1 and scale & (scale - 1) == 0:  # power of two
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f'upscale {scale} is not supported by the pixelshuffle head: use 2^n or 3')
        super().__init__(*layers)


class UpsampleOneStep(nn.Sequential):
    """Light-SR upsampler: conv3x3 C -> scale^2 * out_ch, PixelShuffle(scale) (key ``0.*``)."""

    def __init__(self, scale: int, num_feat: int, num_out_ch: int) -> None:
        super().__init__(nn.Conv2d(num_feat, scale ** 2 * num_out_ch, 3, 1, 1), nn.PixelShuffle(scale))


def _conv_before_upsample(embed_dim: int) -> nn.Sequential:
    # LeakyReLU with the default slope 0.01 (not 0.2), as officially (spec notes 6).
    return nn.Sequential(nn.Conv2d(embed_dim, NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True))


def add_head(net: nn.Module, upsampler: str, embed_dim: int, out_chans: int, upscale: int) -> None:
    """Create the head's modules as attributes of ``net`` (the official names and creation order).

    ``upsampler`` as in the module docstring; ``'nearest+conv'`` raises ``ValueError`` unless ``upscale`` is 4.
    """
    if upsampler == 'pixelshuffle':
        net.conv_before_upsample = _conv_before_upsample(embed_dim)
        net.upsample = Upsample(upscale, NUM_FEAT)
        net.conv_last = nn.Conv2d(NUM_FEAT, out_chans, 3, 1, 1)
    elif upsampler == 'pixelshuffledirect':
        net.upsample = UpsampleOneStep(upscale, embed_dim, out_chans)
    elif upsampler == 'nearest+conv':
        if upscale != 4:
            raise ValueError(f"upsampler 'nearest+conv' supports only upscale 4, got {upscale}")
        net.conv_before_upsample = _conv_before_upsample(embed_dim)
        net.conv_up1 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        net.conv_up2 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        net.conv_hr = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        net.conv_last = nn.Conv2d(NUM_FEAT, out_chans, 3, 1, 1)
        net.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
    else:
        net.conv_last = nn.Conv2d(embed_dim, out_chans, 3, 1, 1)


def apply_head(net: nn.Module, upsampler: str, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The head of :func:`add_head` on the deep features ``f`` (B, C, H, W) of the normalised input ``x``
    (B, out, H, W); returns the normalised output (B, out, s*H, s*W)."""
    if upsampler == 'pixelshuffle':
        return net.conv_last(net.upsample(net.conv_before_upsample(f)))
    if upsampler == 'pixelshuffledirect':
        return net.upsample(f)
    if upsampler == 'nearest+conv':
        f = net.conv_before_upsample(f)
        f = net.lrelu(net.conv_up1(F.interpolate(f, scale_factor=2, mode='nearest')))
        f = net.lrelu(net.conv_up2(F.interpolate(f, scale_factor=2, mode='nearest')))
        return net.conv_last(net.lrelu(net.conv_hr(f)))
    # Denoising / CAR: global residual on the *normalised* input.
    return x + net.conv_last(f)
