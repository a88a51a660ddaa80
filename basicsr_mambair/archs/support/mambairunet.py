"""Support for ``MambaIRUNet`` (the real-image denoising U-Net of MambaIR; spec section 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...errors import CheckpointError
from ..mambairunet_arch import D_STATE, SIZE_MULTIPLE
from .base import ArchFamily, ArchInfo, block_indices, count, expansion_ratio, shape
from .mambair import BYTES_PER_INNER_CHANNEL, BYTES_PER_INNER_CHANNEL_FUSED, ss2d_config

LEVELS = ('encoder_level1', 'encoder_level2', 'encoder_level3', 'latent', 'decoder_level3', 'decoder_level2',
          'decoder_level1', 'refinement')
WIDTH = dict(zip(LEVELS, (1, 2, 4, 8, 4, 2, 2, 2)))  # channels of each level as multiples of dim

UNTRACED = {'drop_path_rate': 0.0}  # the only constructor argument that leaves no trace in the weights


def detect(state_dict: Mapping[str, Any]) -> bool:
    return 'patch_embed.proj.weight' in state_dict and 'output.weight' in state_dict


def infer(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``inp_channels, out_channels, dim, num_blocks, mlp_ratio, num_refinement_blocks, bias, dual_pixel_task``."""
    dim, inp_channels = shape(sd, 'patch_embed.proj.weight')[:2]
    out_channels, out_in = shape(sd, 'output.weight')[:2]
    if out_in != 2 * dim:
        raise CheckpointError(f'output.weight takes {out_in} channels, expected 2 * dim = {2 * dim}')
    counts = {name: count(block_indices(sd, rf'^{name}\.(\d+)\.')[0], name) for name in LEVELS}
    for decoder, encoder in (('decoder_level3', 'encoder_level3'), ('decoder_level2', 'encoder_level2'),
                             ('decoder_level1', 'encoder_level1')):
        if counts[decoder] != counts[encoder]:
            raise CheckpointError(f'{decoder} has {counts[decoder]} blocks but {encoder} {counts[encoder]}; '
                                  'MambaIRUNet mirrors the encoder depths in the decoder')

    mlp_ratio = None
    for name in LEVELS:
        width = dim * WIDTH[name]
        for j in range(counts[name]):
            d_inner, d_state = ss2d_config(sd, f'{name}.{j}.self_attention.', width)
            if d_state != D_STATE:
                raise CheckpointError(f'{name}.{j}: d_state {d_state}; MambaIRUNet uses {D_STATE} everywhere')
            ratio = expansion_ratio(d_inner, width) if mlp_ratio is None else mlp_ratio
            if int(ratio * width) != d_inner:
                raise CheckpointError(f'{name}.{j}: d_inner {d_inner} at width {width} does not fit mlp_ratio {ratio} '
                                      'of the other levels')
            mlp_ratio = ratio
    if mlp_ratio is None:
        raise CheckpointError('no VSSBlock keys in any MambaIRUNet level')

    return {
        'inp_channels': inp_channels, 'out_channels': out_channels, 'dim': dim,
        'num_blocks': [counts['encoder_level1'], counts['encoder_level2'], counts['encoder_level3'], counts['latent']],
        'mlp_ratio': mlp_ratio, 'num_refinement_blocks': counts['refinement'],
        'bias': 'reduce_chan_level3.bias' in sd, 'dual_pixel_task': 'skip_conv.weight' in sd,
    }


def describe(kwargs: Mapping[str, Any]) -> ArchInfo:
    """The UNet's memory estimate: ``120 * int(mlp_ratio * 2 * dim)`` bytes per pixel (its full-resolution decoder
    runs at 2 * dim; 34 with the fused scan) plus the encoder skip (``dim`` values)."""
    dim = int(kwargs.get('dim', 48))
    d_inner = int(float(kwargs.get('mlp_ratio', 2.0)) * 2 * dim)
    return ArchInfo(arch_type='MambaIRUNet', scale=1, in_channels=int(kwargs.get('inp_channels', 3)),
                    out_channels=int(kwargs.get('out_channels', 3)), purpose='Restoration',
                    bytes_per_pixel=BYTES_PER_INNER_CHANNEL * d_inner + 4 * dim,
                    scan_bytes_per_pixel=BYTES_PER_INNER_CHANNEL_FUSED * d_inner + 4 * dim, size_multiple=SIZE_MULTIPLE)


FAMILY = ArchFamily('MambaIRUNet', detect=detect, infer=infer, describe=describe, untraced=UNTRACED)
