"""Support for ``MambaIR`` (v1: classic / light / real-world SR, colour denoising, JPEG CAR; spec section 1)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ...errors import CheckpointError
from ..heads import NUM_FEAT, SR_UPSAMPLERS
from .base import ArchFamily, ArchInfo, block_indices, count, expansion_ratio, shape

# Peak activation memory of one eval/no_grad forward, per LQ pixel, float32, measured on the CPU with
# torch.profiler(profile_memory=True) as the slope between two tile sizes (benchmarks/bench_memory.py): lightSR
# (d_inner 72) 7.1 kB, colorDN / CAR (216) 20.7 kB, classicSR x2 and x4 (360) 31.7 kB, realDN UNet (144 at full
# resolution, in the decoder/refinement at 2 * dim) 14.2 kB, i.e. 85-99 bytes (about 24 float32 values) per
# channel of the SS2D's inner width d_inner: the four scan directions of x, dt and y, the gate and the in/out
# projections. 120 bytes (30 values) bounds each measurement by 20-45 %; the SR head's HR features are added on
# top (they peak after the body has freed).
BYTES_PER_INNER_CHANNEL = 120
# With SS2D's fused CPU scan (ops/scan/fused.py; what a CPU float32 forward runs where the C kernel builds)
# no direction is copied: measured the same way, 18-30 bytes per inner channel (lightSR 21-26, colorDN 29,
# classicSR x2 18, realDN 30; classicSR x4 6, its head dominates). 34 bounds them by 13-85 %.
BYTES_PER_INNER_CHANNEL_FUSED = 34

# Constructor arguments that leave no trace in the weights, with the value a network loaded from a state dict
# gets (the constructor defaults; every official config uses them, img_range included).
UNTRACED = {'img_size': 64, 'patch_size': 1, 'drop_rate': 0.0, 'drop_path_rate': 0.1, 'img_range': 1.0,
            'use_checkpoint': False}


def ss2d_config(state_dict: Mapping[str, torch.Tensor], prefix: str, width: int) -> tuple[int, int]:
    """(d_inner, d_state) of the SS2D at ``prefix``, checking the shapes that follow from them (spec 1.5)."""
    rows, d_state = shape(state_dict, prefix + 'A_logs')
    d_inner = rows // 4
    dt_rank = math.ceil(width / 16)
    expected = {
        'in_proj.weight': (2 * d_inner, width),
        'x_proj_weight': (4, dt_rank + 2 * d_state, d_inner),
        'dt_projs_weight': (4, d_inner, dt_rank),
        'out_proj.weight': (width, d_inner),
    }
    for name, want in expected.items():
        if shape(state_dict, prefix + name) != want:
            raise CheckpointError(f'{prefix}{name} has shape {shape(state_dict, prefix + name)}, expected {want} '
                                  f'for width {width}, d_inner {d_inner}, d_state {d_state}')
    return d_inner, d_state


def infer_resi_connection(sd: Mapping[str, torch.Tensor]) -> str:
    """``'1conv'`` or ``'3conv'``, from the body's last convolution (``conv_after_body``)."""
    if 'conv_after_body.weight' in sd:
        return '1conv'
    if 'conv_after_body.0.weight' in sd:
        return '3conv'
    raise CheckpointError("neither conv_after_body.weight ('1conv') nor conv_after_body.0.weight ('3conv')")


def infer_head(sd: Mapping[str, torch.Tensor], in_chans: int) -> tuple[str, int]:
    """(upsampler, upscale) of the SwinIR-style reconstruction head MambaIR and MambaIRv2 share:
    ``'pixelshuffle'`` (2^n or 3), ``'pixelshuffledirect'``, ``'nearest+conv'`` (real-world SR, x4) or ``''``
    (denoising / CAR, upscale 1)."""
    upsample_convs = sorted(int(m.group(1)) for k in sd if (m := re.match(r'^upsample\.(\d+)\.weight$', k)))
    if 'conv_up1.weight' in sd:
        for key in ('conv_before_upsample.0', 'conv_up1', 'conv_up2', 'conv_hr', 'conv_last'):
            shape(sd, key + '.weight')  # a missing one is named
        if upsample_convs:
            raise CheckpointError('both a nearest+conv head (conv_up1) and upsample.* convs: not one head')
        return 'nearest+conv', 4
    if 'conv_before_upsample.0.weight' in sd:
        outs = [shape(sd, f'upsample.{i}.weight')[0] for i in upsample_convs]
        num_feat = shape(sd, 'conv_before_upsample.0.weight')[0]
        if all(out == 4 * num_feat for out in outs):
            return 'pixelshuffle', 2 ** len(outs)
        if outs == [9 * num_feat]:
            return 'pixelshuffle', 3
        raise CheckpointError(f'pixelshuffle head with upsample conv widths {outs}: not 2^n or 3')
    if upsample_convs == [0]:
        out = shape(sd, 'upsample.0.weight')[0]
        upscale = math.isqrt(out // in_chans)
        if upscale ** 2 * in_chans != out:
            raise CheckpointError(f'upsample.0.weight has {out} outputs: not scale^2 * in_chans ({in_chans})')
        return 'pixelshuffledirect', upscale
    if 'conv_last.weight' in sd:
        return '', 1
    raise CheckpointError('no reconstruction head (conv_before_upsample / upsample.0 / conv_last)')


def detect(state_dict: Mapping[str, Any]) -> bool:
    return 'conv_first.weight' in state_dict and any('.residual_group.blocks.' in k for k in state_dict)


def infer(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``in_chans, embed_dim, depths, d_state, mlp_ratio, upscale, upsampler, resi_connection, patch_norm``."""
    embed_dim, in_chans = shape(sd, 'conv_first.weight')[:2]
    groups = block_indices(sd, r'^layers\.(\d+)\.residual_group\.blocks\.(\d+)\.')
    count(set(groups), 'layers')
    depths = [count(groups[i], f'layers.{i}') for i in range(len(groups))]

    d_inner = d_state = None
    for i, depth in enumerate(depths):
        for j in range(depth):
            config = ss2d_config(sd, f'layers.{i}.residual_group.blocks.{j}.self_attention.', embed_dim)
            if d_inner is None:
                d_inner, d_state = config
            elif config != (d_inner, d_state):
                raise CheckpointError(f'layers.{i}.residual_group.blocks.{j}: (d_inner, d_state) {config} differs from '
                                      f'block 0 ({d_inner}, {d_state}); MambaIR uses one value for all blocks')
    if d_inner is None:
        raise CheckpointError('no VSSBlock keys (layers.{i}.residual_group.blocks.{j}.*)')

    resi_connection = infer_resi_connection(sd)
    upsampler, upscale = infer_head(sd, in_chans)

    light_cab = 'layers.0.residual_group.blocks.0.conv_blk.cab.4.weight' in sd
    if light_cab != (upsampler == 'pixelshuffledirect'):
        if upsampler == 'pixelshuffledirect':
            raise CheckpointError(
                'light-SR head (pixelshuffledirect) with the classic CAB (conv_blk.cab.0 is a 3x3 conv): this is a '
                'lightweight MambaIR checkpoint from before Oct 2024, which the current MambaIR code (and its '
                'released light weights) cannot load; use the current light weights')
        raise CheckpointError(f'light CAB keys (conv_blk.cab.4) with a {upsampler or "denoising"} head: '
                              'MambaIR uses the light CAB only with upsampler pixelshuffledirect')

    return {
        'in_chans': in_chans, 'embed_dim': embed_dim, 'depths': depths, 'd_state': d_state,
        'mlp_ratio': expansion_ratio(d_inner, embed_dim), 'upscale': upscale, 'upsampler': upsampler,
        'resi_connection': resi_connection, 'patch_norm': 'patch_embed.norm.weight' in sd,
    }


def describe(kwargs: Mapping[str, Any]) -> ArchInfo:
    """MambaIR's memory estimate: ``120 * int(mlp_ratio * embed_dim)`` bytes per LQ pixel (34 with the fused scan)
    plus the HR head
    (pixelshuffle and nearest+conv: 64 features, twice, per HR pixel; pixelshuffledirect: the output channels,
    twice)."""
    upsampler = kwargs.get('upsampler') or ''
    scale = int(kwargs.get('upscale', 2)) if upsampler in SR_UPSAMPLERS else 1
    channels = int(kwargs.get('in_chans', 3))
    d_inner = int(float(kwargs.get('mlp_ratio', 2.0)) * int(kwargs.get('embed_dim', 96)))
    head_channels = {'pixelshuffle': 2 * NUM_FEAT, 'nearest+conv': 2 * NUM_FEAT,
                     'pixelshuffledirect': 2 * channels}.get(upsampler, 0)
    return ArchInfo(arch_type='MambaIR', scale=scale, in_channels=channels, out_channels=channels,
                    purpose='SR' if scale > 1 else 'Restoration',
                    bytes_per_pixel=BYTES_PER_INNER_CHANNEL * d_inner + 4 * scale ** 2 * head_channels,
                    scan_bytes_per_pixel=BYTES_PER_INNER_CHANNEL_FUSED * d_inner + 4 * scale ** 2 * head_channels)


FAMILY = ArchFamily('MambaIR', detect=detect, infer=infer, describe=describe, untraced=UNTRACED)
