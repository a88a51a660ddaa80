"""Support for ``MambaIRv2`` and ``MambaIRv2Light`` (spec section 2): one module, two registered archs.

The two networks differ only by the feed-forward networks of their layers, so the key names tell them
apart: ``convffn1.dwconv.*`` (ConvFFN, ``MambaIRv2``) or ``convffn1.sg.*`` (GatedMLP, ``MambaIRv2Light``).
Everything else -- the window attention, the ASSM, the heads -- is inferred by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from ...errors import CheckpointError
from ..mambair_arch import NUM_FEAT
from .base import ArchFamily, ArchInfo, block_indices, constructor_defaults, count, expansion_ratio, shape
from .mambair import infer_head, infer_resi_connection

LAYERS = r'^layers\.(\d+)\.residual_group\.layers\.(\d+)\.'
FFN_KEYS = {'MambaIRv2': 'convffn1.dwconv.', 'MambaIRv2Light': 'convffn1.sg.'}

# Peak activation memory of one eval/no_grad forward per LQ pixel, float32, measured on the CPU with
# torch.profiler(profile_memory=True) as the slope between 48^2 and 96^2 inputs (benchmarks/bench_memory.py):
# v2_lightSR_x2 and x4 (4 heads, embed_dim 48) 11.1 kB, v2_classicSR_Small_x2 (4 heads, 132) 14.5 kB, Base x2 and
# x4, colour DN, CAR (6 heads, 174) 20.3 kB. The peak is in the window attention: its scores and their softmax,
# heads * ws^2 float32 values each per pixel (8.2 kB for 4 heads of 16 x 16 windows, 12.3 kB for 6), plus 46-60
# bytes per token channel (the tokens, their norm, qkv and its windows). 10 bytes per score and 64 per channel
# bound each measurement by 20-45 % (the ASSM and the FFN peak lower); the SR head's HR features are added on top.
BYTES_PER_SCORE = 10
BYTES_PER_CHANNEL = 64

# Constructor arguments that leave no trace in the weights, with the value a network loaded from a state dict
# gets (the constructor defaults; every official config uses them). ``routing=None``: deterministic in eval.
UNTRACED = {'img_size': 64, 'patch_size': 1, 'img_range': 1.0, 'use_checkpoint': False, 'routing': None}
UNTRACED_LIGHT = {**UNTRACED, 'convffn_kernel_size': 5}  # GatedMLP has no ConvFFN kernel


def _arch_of(state_dict: Mapping[str, Any]) -> str | None:
    """``'MambaIRv2'`` / ``'MambaIRv2Light'`` for a state dict with MambaIRv2 layers, else None.

    Any GatedMLP key makes it the light model (mixed FFNs are reported by :func:`infer`)."""
    if 'conv_first.weight' not in state_dict:
        return None
    layer_keys = [k for k in state_dict if '.residual_group.layers.' in k]
    if not any('.assm.' in k for k in layer_keys):
        return None
    return 'MambaIRv2Light' if any(FFN_KEYS['MambaIRv2Light'] in k for k in layer_keys) else 'MambaIRv2'


def _window_size(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, int]:
    """(window_size, num_heads) from ``win_mhsa.relative_position_bias_table`` ((2ws - 1)^2, heads)."""
    key = prefix + 'win_mhsa.relative_position_bias_table'
    rows, heads = shape(sd, key)
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise CheckpointError(f'{key} has {rows} rows: not (2 * window_size - 1)^2')
    return (side + 1) // 2, heads


def layer_config(sd: Mapping[str, torch.Tensor], prefix: str, dim: int, arch_type: str) -> dict[str, Any]:
    """The configuration of the AttentiveLayer at ``prefix``, checking every shape that follows from it."""
    window_size, heads = _window_size(sd, prefix)
    if dim % heads:
        raise CheckpointError(f'{prefix}win_mhsa.relative_position_bias_table: {heads} heads do not divide '
                              f'embed_dim {dim}')
    inner_rank, d_state = shape(sd, prefix + 'embeddingA.weight')
    num_tokens = shape(sd, prefix + 'assm.embeddingB.weight')[0]
    hidden = shape(sd, prefix + 'assm.in_proj.0.weight')[0]
    dt_rank = math.ceil(hidden / 16)
    scan = 'assm.selectiveScan.'
    expected = {
        'wqkv.weight': (3 * dim, dim),
        'assm.embeddingB.weight': (num_tokens, inner_rank),
        'assm.in_proj.0.weight': (hidden, dim, 1, 1),
        'assm.route.0.weight': (dim // 3, dim),
        'assm.route.2.weight': (num_tokens, dim // 3),
        scan + 'x_proj_weight': (1, dt_rank + 2 * d_state, hidden),
        scan + 'dt_projs_weight': (1, hidden, dt_rank),
        scan + 'A_logs': (hidden, d_state),
        'assm.out_proj.weight': (dim, hidden),
        'convffn1.fc1.weight': (hidden, dim),
        'convffn2.fc1.weight': (hidden, dim),
    }
    other = next(name for name in FFN_KEYS if name != arch_type)
    if any(k.startswith(prefix + FFN_KEYS[other]) for k in sd):
        raise CheckpointError(f'{prefix}: {other} feed-forward keys ({FFN_KEYS[other]}*) in a {arch_type} '
                              f'state dict ({FFN_KEYS[arch_type]}* elsewhere)')
    kernel = None
    if arch_type == 'MambaIRv2':
        kernel = shape(sd, prefix + 'convffn1.dwconv.depthwise_conv.0.weight')[-1]
        expected.update({f'convffn{n}.dwconv.depthwise_conv.0.weight': (hidden, 1, kernel, kernel) for n in (1, 2)})
        expected.update({f'convffn{n}.fc2.weight': (dim, hidden) for n in (1, 2)})
    else:
        expected.update({f'convffn{n}.sg.conv.weight': (hidden // 2, 1, 5, 5) for n in (1, 2)})
        expected.update({f'convffn{n}.fc2.weight': (dim, hidden // 2) for n in (1, 2)})
    for name, want in expected.items():
        if shape(sd, prefix + name) != want:
            raise CheckpointError(f'{prefix}{name} has shape {shape(sd, prefix + name)}, expected {want} for '
                                  f'embed_dim {dim}, hidden {hidden}, d_state {d_state}, inner_rank {inner_rank}, '
                                  f'num_tokens {num_tokens}')
    return {'window_size': window_size, 'num_heads': heads, 'inner_rank': inner_rank, 'd_state': d_state,
            'num_tokens': num_tokens, 'hidden': hidden, 'convffn_kernel_size': kernel,
            'qkv_bias': prefix + 'wqkv.bias' in sd}


def infer_as(arch_type: str, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``in_chans, embed_dim, depths, num_heads, window_size, inner_rank, num_tokens, d_state, mlp_ratio,
    [convffn_kernel_size (MambaIRv2 only),] qkv_bias, patch_norm, upscale, upsampler, resi_connection, ape
    [, img_size (with ape)]`` of an ``arch_type`` state dict, from key names and shapes."""
    embed_dim, in_chans = shape(sd, 'conv_first.weight')[:2]
    groups = block_indices(sd, LAYERS)
    count(set(groups), 'layers')
    depths = [count(groups[i], f'layers.{i}') for i in range(len(groups))]
    if not depths:
        raise CheckpointError('no AttentiveLayer keys (layers.{i}.residual_group.layers.{j}.*)')

    first: dict[str, Any] | None = None
    num_heads = []
    for i, depth in enumerate(depths):
        for j in range(depth):
            prefix = f'layers.{i}.residual_group.layers.{j}.'
            config = layer_config(sd, prefix, embed_dim, arch_type)
            if j == 0:
                num_heads.append(config['num_heads'])
            elif config['num_heads'] != num_heads[i]:
                raise CheckpointError(f'{prefix}: {config["num_heads"]} heads, layer 0 of the group '
                                      f'{num_heads[i]}; MambaIRv2 uses one value per group')
            shared = {k: v for k, v in config.items() if k != 'num_heads'}
            if first is None:
                first = shared
            elif shared != first:
                diff = ', '.join(f'{k} {shared[k]} vs {first[k]}' for k in shared if shared[k] != first[k])
                raise CheckpointError(f'{prefix}: {diff} in layer 0 of group 0; MambaIRv2 uses one value for '
                                      'all layers')
    assert first is not None

    window_size = first['window_size']
    buffer = 'relative_position_index_SA'
    if buffer in sd and shape(sd, buffer) != (window_size ** 2,) * 2:
        raise CheckpointError(f'{buffer} has shape {shape(sd, buffer)}, but the attention tables say window_size '
                              f'{window_size}, i.e. {(window_size ** 2,) * 2}')
    upsampler, upscale = infer_head(sd, in_chans)
    config = {
        'in_chans': in_chans, 'embed_dim': embed_dim, 'depths': depths, 'num_heads': num_heads,
        'window_size': window_size, 'inner_rank': first['inner_rank'], 'num_tokens': first['num_tokens'],
        'd_state': first['d_state'], 'mlp_ratio': expansion_ratio(first['hidden'], embed_dim),
        'qkv_bias': first['qkv_bias'], 'patch_norm': 'patch_embed.norm.weight' in sd,
        'upscale': upscale, 'upsampler': upsampler, 'resi_connection': infer_resi_connection(sd),
        'ape': 'absolute_pos_embed' in sd,
    }
    if arch_type == 'MambaIRv2':
        config['convffn_kernel_size'] = first['convffn_kernel_size']
    if config['ape']:  # the embedding's size is that of img_size^2 patches (patch_size 1, as officially)
        positions = shape(sd, 'absolute_pos_embed')[1]
        config['img_size'] = math.isqrt(positions)
        if config['img_size'] ** 2 != positions:
            raise CheckpointError(f'absolute_pos_embed has {positions} positions: not img_size^2')
    return config


def describe_as(arch_type: str, kwargs: Mapping[str, Any]) -> ArchInfo:
    """MambaIRv2's memory estimate per LQ pixel: ``10 * heads * ws^2`` (the attention scores of the group with
    the most heads) + ``64 * embed_dim`` bytes + the HR head as for MambaIR (nearest+conv: three 64-channel maps).
    Sides are padded to multiples of ``window_size`` inside the network: tiles are multiples of it."""
    full = {**constructor_defaults(arch_type), **kwargs}
    upsampler = full['upsampler'] or ''
    heads = max(list(full['num_heads'])[:len(full['depths'])])
    ws = int(full['window_size'])
    scale = int(full['upscale']) if upsampler in ('pixelshuffle', 'pixelshuffledirect', 'nearest+conv') else 1
    channels = int(full['in_chans'])
    head_channels = {'pixelshuffle': 2 * NUM_FEAT, 'nearest+conv': 3 * NUM_FEAT,
                     'pixelshuffledirect': 2 * channels}.get(upsampler, 0)
    return ArchInfo(arch_type=arch_type, scale=scale, in_channels=channels, out_channels=channels,
                    purpose='SR' if scale > 1 else 'Restoration',
                    bytes_per_pixel=BYTES_PER_SCORE * heads * ws * ws + BYTES_PER_CHANNEL * int(full['embed_dim'])
                    + 4 * scale ** 2 * head_channels,
                    size_multiple=ws, fp16=True, bf16=True)


FAMILIES = tuple(
    ArchFamily(arch_type, detect=lambda sd, a=arch_type: _arch_of(sd) == a, infer=partial(infer_as, arch_type),
               describe=partial(describe_as, arch_type), untraced=untraced)
    for arch_type, untraced in (('MambaIRv2', UNTRACED), ('MambaIRv2Light', UNTRACED_LIGHT))
)
