"""MambaIR (v1): residual groups of VSSBlocks between a 3x3 conv stem and a task head (spec 1).

Checkpoint-compatible with the official ``basicsr/archs/mambair_arch.py`` (strict=True): same
constructor arguments and defaults, same parameter names and shapes, same forward. Runs on any
device (the selective scan is pure PyTorch), any input size (no padding needed), any batch size.

Heads (``upsampler``, see :mod:`.heads`, shared with MambaIRv2):
    ``'pixelshuffle'``        classic SR: conv->64, LeakyReLU(0.01), (conv, PixelShuffle) x log2(s) or x1 (s=3), conv.
    ``'pixelshuffledirect'``  light SR: one conv to s^2 * in_chans channels and a PixelShuffle; light CAB.
    ``'nearest+conv'``        real-world SR, x4 only: two nearest x2 + conv stages (not in the official v1 code,
                              which has no such head; its keys and forward are those of MambaIRv2's, spec 2.2).
                              The blocks keep the classic CAB (``is_light_sr`` is only set by pixelshuffledirect):
                              which CAB the released MambaIR_realSR weights use is unknown, config inference
                              reads it from the keys and refuses a light CAB with this head.
    anything else (``''``)    denoising / JPEG CAR (upscale 1): ``out = x + conv_last(features)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.utils.checkpoint
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .arch_util import map_to_tokens, tokens_to_map
from .channel_attention import min_channels
from .heads import NUM_FEAT, Upsample, UpsampleOneStep, add_head, apply_head
from .vss_block import VSSBlock

__all__ = ['MambaIR', 'NUM_FEAT', 'RGB_MEAN', 'PatchEmbed', 'ResidualGroup', 'Upsample', 'UpsampleOneStep', 'VSSLayer',
           'make_resi_connection']

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted from 3-channel inputs (not a parameter)


def make_resi_connection(dim: int, resi_connection: str) -> nn.Module:
    """The conv closing a residual group / the body: ``'1conv'`` = conv3x3; ``'3conv'`` = bottleneck C/4."""
    if resi_connection == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == '3conv':
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


class PatchEmbed(nn.Module):
    """Feature map -> tokens, optionally layer-normalised (key ``norm.*`` when ``norm_layer`` is given).

    ``img_size`` / ``patch_size`` are only recorded (patch size 1 is the only one MambaIR uses).
    """

    def __init__(self, img_size: int | Sequence[int] = 64, patch_size: int | Sequence[int] = 1, embed_dim: int = 96,
                 norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W, C)."""
        x = map_to_tokens(x)
        return self.norm(x) if self.norm is not None else x


class VSSLayer(nn.Module):
    """A stack of VSSBlocks at one resolution (official ``BasicLayer``; keys ``blocks.{j}.*``).

    Args:
        dim: channels C.
        depth: number of blocks.
        drop_path: stochastic-depth probability per block (a list) or for all blocks.
        d_state, mlp_ratio, is_light_sr: see :class:`VSSBlock` (``mlp_ratio`` is the SS2D expansion).
        use_checkpoint: recompute each block in the backward pass (saves activation memory in training).
    """

    def __init__(self, dim: int, depth: int, drop_path: float | Sequence[float] = 0.0, d_state: int = 16,
                 mlp_ratio: float = 2.0, use_checkpoint: bool = False, is_light_sr: bool = False) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            VSSBlock(hidden_dim=dim, drop_path=rates[j], norm_layer=nn.LayerNorm, attn_drop_rate=0.0, d_state=d_state,
                     expand=mlp_ratio, is_light_sr=is_light_sr) for j in range(depth))

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        """x: (B, H*W, C); x_size: (H, W)."""
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                # The official flag is broken (it drops x_size); this is the intended behaviour.
                x = torch.utils.checkpoint.checkpoint(block, x, x_size, use_reentrant=False)
            else:
                x = block(x, x_size)
        return x


class ResidualGroup(nn.Module):
    """Residual state-space group (RSSG): ``x + conv(VSSLayer(x))`` (keys ``residual_group.*``, ``conv.*``)."""

    def __init__(self, dim: int, depth: int, d_state: int = 16, mlp_ratio: float = 2.0,
                 drop_path: float | Sequence[float] = 0.0, use_checkpoint: bool = False,
                 resi_connection: str = '1conv', is_light_sr: bool = False) -> None:
        super().__init__()
        self.residual_group = VSSLayer(dim, depth, drop_path=drop_path, d_state=d_state, mlp_ratio=mlp_ratio,
                                       use_checkpoint=use_checkpoint, is_light_sr=is_light_sr)
        self.conv = make_resi_connection(dim, resi_connection)

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        y = tokens_to_map(self.residual_group(x, x_size), x_size)
        return map_to_tokens(self.conv(y)) + x


@ARCH_REGISTRY.register()
class MambaIR(nn.Module):
    """MambaIR: "A Simple Baseline for Image Restoration with State-Space Model" (Guo et al., ECCV 2024).

    Args (official names and defaults):
        img_size: recorded only; any input size works.
        patch_size: recorded only.
        in_chans: input = output channels (1 for CAR, 3 otherwise).
        embed_dim: feature width C.
        depths: blocks per residual group; ``len(depths)`` groups.
        drop_rate: dropout after the patch embedding.
        d_state: SSM state size N.
        mlp_ratio: SS2D expansion (``d_inner = int(mlp_ratio * C)``; MambaIR has no MLP).
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks (training only).
        norm_layer: norm of the patch embedding and the final norm.
        patch_norm: layer-normalise the embedded tokens.
        use_checkpoint: activation checkpointing per block (memory for compute in training).
        upscale: SR factor (1 for denoising / CAR).
        img_range: inputs are scaled by this after mean subtraction (255 in the tiny CAR reference).
        upsampler: ``'pixelshuffle'`` (classic SR), ``'pixelshuffledirect'`` (light SR), ``'nearest+conv'``
            (real-world SR, x4 only; not official in v1) or ``''`` (DN / CAR).
        resi_connection: ``'1conv'`` or ``'3conv'``.
        **kwargs: ignored, as officially (option files pass e.g. ``window_size``, ``num_heads``).

    Shapes: (B, in_chans, H, W) -> (B, in_chans, upscale*H, upscale*W).
    """

    def __init__(self, img_size: int | Sequence[int] = 64, patch_size: int | Sequence[int] = 1, in_chans: int = 3,
                 embed_dim: int = 96, depths: Sequence[int] = (6, 6, 6, 6), drop_rate: float = 0.0, d_state: int = 16,
                 mlp_ratio: float = 2.0, drop_path_rate: float = 0.1, norm_layer: type[nn.Module] = nn.LayerNorm,
                 patch_norm: bool = True, use_checkpoint: bool = False, upscale: int = 2, img_range: float = 1.0,
                 upsampler: str | None = '', resi_connection: str = '1conv', **kwargs) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.depths = list(depths)
        self.num_layers = len(depths)
        self.d_state = d_state
        self.mlp_ratio = mlp_ratio
        self.patch_norm = patch_norm
        self.upscale = upscale
        self.img_range = img_range
        self.upsampler = upsampler or ''
        self.resi_connection = resi_connection
        self.is_light_sr = self.upsampler == 'pixelshuffledirect'
        if embed_dim < min_channels(self.is_light_sr):
            raise ValueError(f'MambaIR needs embed_dim >= {min_channels(self.is_light_sr)} (its channel attention '
                             f'squeezes the channels by 30), got {embed_dim}')
        # A plain attribute, not a buffer: it is not in the official state dict, and forward moves it
        # to the input's device/dtype each call (cheap: 3 numbers).
        self.mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)

        # 2. deep features: residual groups on tokens
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim, norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(self.depths):
            start = sum(self.depths[:i])
            self.layers.append(ResidualGroup(embed_dim, depth, d_state=d_state, mlp_ratio=mlp_ratio,
                                             drop_path=dpr[start:start + depth], use_checkpoint=use_checkpoint,
                                             resi_connection=resi_connection, is_light_sr=self.is_light_sr))
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = make_resi_connection(embed_dim, resi_connection)

        # 3. reconstruction head
        add_head(self, self.upsampler, embed_dim, in_chans, upscale)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: Linear weights ~ N(0, 0.02) truncated at +-2, zero biases; LayerNorm 1 / 0."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) through all residual groups."""
        x_size = x.shape[-2:]
        t = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            t = layer(t, x_size)
        return tokens_to_map(self.norm(t), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) in [0, 1] -> (B, in_chans, upscale*H, upscale*W) (not clamped)."""
        mean = self.mean.to(x)
        # Channels-last from the start (a copy of the small input): the first conv's features then are
        # tokens already, and the body runs in one layout.
        x = ((x - mean) * self.img_range).contiguous(memory_format=torch.channels_last)
        f = self.conv_first(x)
        f = self.conv_after_body(self.forward_features(f)) + f
        x = apply_head(self, self.upsampler, f, x)
        return (x / self.img_range + mean).contiguous()  # the usual NCHW layout for the caller
