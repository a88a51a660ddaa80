"""MambaIRUNet: the real-image denoising network of MambaIR (Restormer's U-Net with VSSBlocks; spec 3).

Checkpoint-compatible with the official ``realDenoising/basicsr/models/archs/mambairunet_arch.py``
(strict=True, 26,779,480 parameters at the released config).

Layout (C = ``dim``; all convs without bias, except inside the VSSBlocks; checkpoint key prefixes as literals):

* embed: ``patch_embed.proj`` conv3x3 -> C at H x W;
* encoder levels ``encoder_level{1,2,3}.{i}`` (VSSBlocks at C, 2C, 4C), each followed by
  ``down{1_2,2_3,3_4}.body.0`` (conv3x3 to half the channels + PixelUnshuffle(2): 2x channels, half size);
* ``latent.{i}`` at 8C, H/8 x W/8;
* decoder levels 3 and 2: ``up{4_3,3_2}.body.0`` (conv3x3 to 2x channels + PixelShuffle(2)), concat
  [upsampled, encoder skip], ``reduce_chan_level{3,2}`` (1x1 back to 4C / 2C), ``decoder_level{3,2}.{i}``;
* decoder level 1: ``up2_1`` to C, concat with the level-1 skip -> 2C (no reduction),
  ``decoder_level1.{i}`` and ``refinement.{i}`` at 2C;
* ``output`` conv3x3 2C -> out_channels, plus the input image (global residual).

Every SS2D has ``d_state = 16`` (official: ``base_d_state = 4`` times 4, and 4 / 2 * 8 for the latent).

**Input size.** The official network needs H and W divisible by 8 (three 2x downsamplings); the
official real-DN validation pads by reflection to a multiple of 8 and crops (Restormer's ``pad_test``).
This forward does the same internally, so any size works. For inputs whose sides are already
multiples of 8 nothing is padded and the output equals the official forward exactly; for other
sizes it equals the official validation result (reflect padding at the bottom/right, then crop).
"""

from __future__ import annotations

from typing import Sequence

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .arch_util import map_to_tokens, pad_to_multiple, tokens_to_map
from .channel_attention import min_channels
from .vss_block import VSSBlock

SIZE_MULTIPLE = 8  # 2 ** (number of downsamplings)
D_STATE = 16


class OverlapPatchEmbed(nn.Module):
    """Conv3x3 embedding of the image (key ``proj.weight``): (B, in, H, W) -> (B, C, H, W)."""

    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, 3, 1, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """conv3x3 C -> C/2 then PixelUnshuffle(2): (B, C, H, W) -> (B, 2C, H/2, W/2) (key ``body.0``)."""

    def __init__(self, n_feat: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, 1, 1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """conv3x3 C -> 2C then PixelShuffle(2): (B, C, H, W) -> (B, C/2, 2H, 2W) (key ``body.0``)."""

    def __init__(self, n_feat: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, 1, 1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@ARCH_REGISTRY.register()
class MambaIRUNet(nn.Module):
    """U-Net of VSSBlocks for real-image denoising.

    Args (official names and defaults):
        inp_channels: input channels.
        out_channels: output channels (must equal ``inp_channels`` for the global residual unless
            ``dual_pixel_task``).
        dim: width C of level 1.
        num_blocks: VSSBlocks per level (encoder levels 1-3 and latent; decoders mirror levels 3-1).
        mlp_ratio: SS2D expansion.
        num_refinement_blocks: VSSBlocks after decoder level 1 (at 2C).
        drop_path_rate: stochastic depth of every block (constant, not a schedule, as officially).
        bias: bias of the two 1x1 channel-reduction convs (and ``skip_conv``).
        dual_pixel_task: Restormer's dual-pixel defocus-deblurring variant: adds ``skip_conv`` (1x1, C -> 2C)
            and replaces the image residual by a feature residual. (The official forward of this variant
            fails on token tensors; here it runs as intended.)

    Shapes: (B, inp_channels, H, W) -> (B, out_channels, H, W), any H, W (see the module docstring).
    """

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), mlp_ratio: float = 2.0, num_refinement_blocks: int = 4,
                 drop_path_rate: float = 0.0, bias: bool = False, dual_pixel_task: bool = False) -> None:
        super().__init__()
        if dim < min_channels() or dim % 2:
            raise ValueError(f'MambaIRUNet needs an even dim >= {min_channels()} (its channel attention squeezes the '
                             f'channels by 30; the down/up-sampling halves and doubles them), got {dim}')
        self.inp_channels = inp_channels
        self.out_channels = out_channels
        self.dim = dim
        self.num_blocks = list(num_blocks)
        self.mlp_ratio = mlp_ratio
        self.num_refinement_blocks = num_refinement_blocks
        self.bias = bias
        self.dual_pixel_task = dual_pixel_task

        def level(width: int, depth: int) -> nn.ModuleList:
            return nn.ModuleList(
                VSSBlock(hidden_dim=width, drop_path=drop_path_rate, norm_layer=nn.LayerNorm, attn_drop_rate=0.0,
                         expand=mlp_ratio, d_state=D_STATE) for _ in range(depth))

        n1, n2, n3, n4 = self.num_blocks
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = level(dim, n1)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = level(dim * 2, n2)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = level(dim * 4, n3)
        self.down3_4 = Downsample(dim * 4)
        self.latent = level(dim * 8, n4)

        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = level(dim * 4, n3)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = level(dim * 2, n2)
        self.up2_1 = Upsample(dim * 2)  # no channel reduction at level 1: the decoder runs at 2C
        self.decoder_level1 = level(dim * 2, n1)
        self.refinement = level(dim * 2, num_refinement_blocks)

        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, 1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, 3, 1, 1, bias=bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """Apply a level's VSSBlocks to a (B, C, h, w) map; returns (B, C, h, w)."""
        if len(blocks) == 0:
            return x
        size = x.shape[-2:]
        t = map_to_tokens(x)
        for block in blocks:
            t = block(t, size)
        return tokens_to_map(t, size)

    def forward(self, inp_img: torch.Tensor) -> torch.Tensor:
        """(B, inp_channels, H, W) -> (B, out_channels, H, W)."""
        h, w = inp_img.shape[-2:]
        x = pad_to_multiple(inp_img, SIZE_MULTIPLE)

        emb = self.patch_embed(x)
        enc1 = self._run(self.encoder_level1, emb)
        enc2 = self._run(self.encoder_level2, self.down1_2(enc1))
        enc3 = self._run(self.encoder_level3, self.down2_3(enc2))
        latent = self._run(self.latent, self.down3_4(enc3))

        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1))
        dec3 = self._run(self.decoder_level3, dec3)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1))
        dec2 = self._run(self.decoder_level2, dec2)
        dec1 = torch.cat([self.up2_1(dec2), enc1], dim=1)
        dec1 = self._run(self.refinement, self._run(self.decoder_level1, dec1))

        if self.dual_pixel_task:
            out = self.output(dec1 + self.skip_conv(emb))
        else:
            out = self.output(dec1) + x
        return out[..., :h, :w]
