"""Reading, recognising and loading MambaIR-family checkpoints, with one clear error per failure.

* :func:`read_state_dict` -- ``torch.load(weights_only=True)`` (never executes pickled code), picks the
  ``params`` / ``params_ema`` entry like BasicSR, strips ``module.`` prefixes.
* :func:`infer_config` -- the arch type and every parameter-shaping constructor argument of a
  MambaIR / MambaIRUNet state dict, from key names and shapes alone.
* :func:`matching_presets` / :func:`explain_preset_mismatch` -- which official configuration
  (:data:`basicsr_mambair.presets.PRESETS`) a state dict is, or how it differs from the closest one.
* :func:`load_checked` -- ``load_state_dict`` whose failure names the configuration difference
  (e.g. ``embed_dim: 180 in checkpoint, 60 in network options``) and the offending keys; with
  ``strict=False`` it follows BasicSR (keys of another shape are skipped with a warning).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import pickle
import re
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ['CheckpointError', 'LoadReport', 'detect_arch_type', 'explain_preset_mismatch', 'infer_config',
           'load_checked', 'matching_presets', 'read_state_dict']

_MAX_LISTED = 5  # keys shown per category in error messages


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read safely, is not a MambaIR-family state dict, or does not fit the network."""


def _logger(logger: logging.Logger | None) -> logging.Logger:
    return logger if logger is not None else logging.getLogger('basicsr')  # BasicSR's root logger


def _first_line(exc: BaseException, prefer: tuple[str, ...] = ()) -> str:
    """The most telling line of an exception message (one containing a ``prefer`` word, else the first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if any(word in line for word in prefer):
            return line
    return lines[0] if lines else type(exc).__name__


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds, as BasicSR does."""
    return OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v) for k, v in state_dict.items())


def read_state_dict(path: str | os.PathLike, param_key: str | None = 'params',
                    logger: logging.Logger | None = None) -> OrderedDict[str, torch.Tensor]:
    """Read the network weights of a checkpoint file, safely.

    Args:
        path: a file written by ``torch.save``.
        param_key: the entry holding the weights (BasicSR: ``'params'``, or ``'params_ema'`` for the EMA
            network). Falls back to ``'params'`` when the requested key is absent (as BasicSR), and to the
            whole file when it is itself a bare state dict. ``None`` requires a bare state dict.
        logger: where the ``params`` fallback is reported (default: BasicSR's ``basicsr`` logger).

    Returns:
        ``{name: tensor}`` on the CPU, without ``module.`` prefixes.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt/truncated/not a checkpoint, contains pickled code or objects
            (refused: ``weights_only=True``), or holds no state dict under ``param_key``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        with warnings.catch_warnings():
            # Harmless notice for checkpoints pickled with protocol > 2.
            warnings.filterwarnings('ignore', message='.*pickle protocol.*')
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _first_line(exc, prefer=('GLOBAL', 'global'))
        if 'global' not in detail.lower():  # e.g. 'Unsupported operand': garbage or a non-torch pickle
            raise CheckpointError(f'cannot read checkpoint {path}: the file is truncated or corrupt, or not a '
                                  f'PyTorch checkpoint (UnpicklingError: {detail})') from None
        raise CheckpointError(
            f'refusing to load {path}: it contains pickled Python objects other than tensors and plain containers, '
            f'and unpickling them could run arbitrary code (torch.load(weights_only=True): {detail}). '
            'If you trust the file, re-save just its state dict (torch.save(state_dict, path)) and load that.'
        ) from None
    except Exception as exc:  # noqa: BLE001  (torch raises RuntimeError/EOFError/KeyError/... for bad files)
        raise CheckpointError(
            f'cannot read checkpoint {path}: the file is truncated or corrupt, or not a PyTorch checkpoint '
            f'({type(exc).__name__}: {_first_line(exc)})') from None

    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a state dict or a dict of state dicts')
    if param_key is not None and isinstance(obj.get(param_key), Mapping):
        state_dict = obj[param_key]
    elif param_key is not None and param_key != 'params' and isinstance(obj.get('params'), Mapping):
        _logger(logger).info(f'Loading: {param_key} does not exist, use params.')
        state_dict = obj['params']
    elif _is_tensor_mapping(obj):
        state_dict = obj
    else:
        entries = ', '.join(repr(k) for k in list(obj)[:10])
        raise CheckpointError(f'{path} has no state dict under {param_key!r} and is not a bare state dict; '
                              f'its top-level entries: {entries} (choose one with param_key / path.param_key_g)')
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'{path}: the state dict has non-tensor entries: {", ".join(bad[:_MAX_LISTED])}')
    return _strip_module_prefix(state_dict)


# ----------------------------------------------------------------------------------------------------------------
# Recognising a state dict


def detect_arch_type(state_dict: Mapping[str, Any]) -> str:
    """``'MambaIR'``, ``'MambaIRUNet'``, ``'MambaIRv2'`` or ``'MambaIRv2Light'`` from the key names alone.

    Raises:
        CheckpointError: none of them.
    """
    keys = list(state_dict)
    if 'relative_position_index_SA' in state_dict or any('.assm.' in k for k in keys):
        return 'MambaIRv2Light' if any('.convffn1.sg.' in k for k in keys) else 'MambaIRv2'
    if 'conv_first.weight' in state_dict and any('.residual_group.blocks.' in k for k in keys):
        return 'MambaIR'
    if 'patch_embed.proj.weight' in state_dict and 'output.weight' in state_dict:
        return 'MambaIRUNet'
    shown = ', '.join(keys[:_MAX_LISTED]) or '(empty)'
    raise CheckpointError(f'not a MambaIR-family state dict (first keys: {shown})')


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f'key {key!r} is missing')
    return tuple(state_dict[key].shape)


def _expansion_ratio(d_inner: int, width: int) -> float:
    """The simplest ratio r (fewest decimals) with ``int(r * width) == d_inner``, as SS2D computes it."""
    for digits in range(7):
        ratio = round(d_inner / width, digits)
        if int(ratio * width) == d_inner:
            return float(ratio)
    return (d_inner + 0.5) / width


def _block_indices(state_dict: Mapping[str, Any], pattern: str) -> dict[int, set[int]]:
    """{outer index: {inner indices}} of keys matching ``pattern`` with two groups (or {0: {...}} for one)."""
    found: dict[int, set[int]] = defaultdict(set)
    regex = re.compile(pattern)
    for key in state_dict:
        match = regex.match(key)
        if match:
            groups = [int(g) for g in match.groups()]
            outer, inner = (0, groups[0]) if len(groups) == 1 else groups
            found[outer].add(inner)
    return found


def _count(indices: set[int], what: str) -> int:
    if indices != set(range(len(indices))):
        raise CheckpointError(f'{what}: block indices {sorted(indices)} are not 0..n-1')
    return len(indices)


def _ss2d_config(state_dict: Mapping[str, torch.Tensor], prefix: str, width: int) -> tuple[int, int]:
    """(d_inner, d_state) of the SS2D at ``prefix``, checking the shapes that follow from them."""
    rows, d_state = _shape(state_dict, prefix + 'A_logs')
    d_inner = rows // 4
    dt_rank = math.ceil(width / 16)
    expected = {
        'in_proj.weight': (2 * d_inner, width),
        'x_proj_weight': (4, dt_rank + 2 * d_state, d_inner),
        'dt_projs_weight': (4, d_inner, dt_rank),
        'out_proj.weight': (width, d_inner),
    }
    for name, shape in expected.items():
        if _shape(state_dict, prefix + name) != shape:
            raise CheckpointError(f'{prefix}{name} has shape {_shape(state_dict, prefix + name)}, expected {shape} '
                                  f'for width {width}, d_inner {d_inner}, d_state {d_state}')
    return d_inner, d_state


def _infer_mambair(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    embed_dim, in_chans = _shape(sd, 'conv_first.weight')[:2]
    groups = _block_indices(sd, r'^layers\.(\d+)\.residual_group\.blocks\.(\d+)\.')
    _count(set(groups), 'layers')
    depths = [_count(groups[i], f'layers.{i}') for i in range(len(groups))]

    d_inner = d_state = None
    for i, depth in enumerate(depths):
        for j in range(depth):
            config = _ss2d_config(sd, f'layers.{i}.residual_group.blocks.{j}.self_attention.', embed_dim)
            if d_inner is None:
                d_inner, d_state = config
            elif config != (d_inner, d_state):
                raise CheckpointError(f'layers.{i}.residual_group.blocks.{j}: (d_inner, d_state) {config} differs from '
                                      f'block 0 ({d_inner}, {d_state}); MambaIR uses one value for all blocks')
    if d_inner is None:
        raise CheckpointError('no VSSBlock keys (layers.{i}.residual_group.blocks.{j}.*)')

    if 'conv_after_body.weight' in sd:
        resi_connection = '1conv'
    elif 'conv_after_body.0.weight' in sd:
        resi_connection = '3conv'
    else:
        raise CheckpointError("neither conv_after_body.weight ('1conv') nor conv_after_body.0.weight ('3conv')")

    upsample_convs = sorted(int(m.group(1)) for k in sd if (m := re.match(r'^upsample\.(\d+)\.weight$', k)))
    if 'conv_before_upsample.0.weight' in sd:
        upsampler = 'pixelshuffle'
        outs = [_shape(sd, f'upsample.{i}.weight')[0] for i in upsample_convs]
        num_feat = _shape(sd, 'conv_before_upsample.0.weight')[0]
        if all(out == 4 * num_feat for out in outs):
            upscale = 2 ** len(outs)
        elif outs == [9 * num_feat]:
            upscale = 3
        else:
            raise CheckpointError(f'pixelshuffle head with upsample conv widths {outs}: not 2^n or 3')
    elif upsample_convs == [0]:
        upsampler = 'pixelshuffledirect'
        out = _shape(sd, 'upsample.0.weight')[0]
        upscale = math.isqrt(out // in_chans)
        if upscale ** 2 * in_chans != out:
            raise CheckpointError(f'upsample.0.weight has {out} outputs: not scale^2 * in_chans ({in_chans})')
    elif 'conv_last.weight' in sd:
        upsampler, upscale = '', 1
    else:
        raise CheckpointError('no reconstruction head (conv_before_upsample / upsample.0 / conv_last)')

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
        'mlp_ratio': _expansion_ratio(d_inner, embed_dim), 'upscale': upscale, 'upsampler': upsampler,
        'resi_connection': resi_connection, 'patch_norm': 'patch_embed.norm.weight' in sd,
    }


_UNET_LEVELS = ('encoder_level1', 'encoder_level2', 'encoder_level3', 'latent', 'decoder_level3', 'decoder_level2',
                'decoder_level1', 'refinement')
_UNET_WIDTH = dict(zip(_UNET_LEVELS, (1, 2, 4, 8, 4, 2, 2, 2)))  # multiples of dim


def _infer_mambairunet(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    dim, inp_channels = _shape(sd, 'patch_embed.proj.weight')[:2]
    out_channels, out_in = _shape(sd, 'output.weight')[:2]
    if out_in != 2 * dim:
        raise CheckpointError(f'output.weight takes {out_in} channels, expected 2 * dim = {2 * dim}')
    counts = {name: _count(_block_indices(sd, rf'^{name}\.(\d+)\.')[0], name) for name in _UNET_LEVELS}
    for decoder, encoder in (('decoder_level3', 'encoder_level3'), ('decoder_level2', 'encoder_level2'),
                             ('decoder_level1', 'encoder_level1')):
        if counts[decoder] != counts[encoder]:
            raise CheckpointError(f'{decoder} has {counts[decoder]} blocks but {encoder} {counts[encoder]}; '
                                  'MambaIRUNet mirrors the encoder depths in the decoder')

    mlp_ratio = None
    for name in _UNET_LEVELS:
        width = dim * _UNET_WIDTH[name]
        for j in range(counts[name]):
            d_inner, d_state = _ss2d_config(sd, f'{name}.{j}.self_attention.', width)
            if d_state != 16:
                raise CheckpointError(f'{name}.{j}: d_state {d_state}; MambaIRUNet uses 16 everywhere')
            ratio = _expansion_ratio(d_inner, width) if mlp_ratio is None else mlp_ratio
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


def infer_config(state_dict: Mapping[str, torch.Tensor], explain: bool = False) -> tuple[str, dict[str, Any]]:
    """The arch type and the parameter-shaping constructor arguments of a state dict.

    MambaIR: ``in_chans, embed_dim, depths, d_state, mlp_ratio, upscale, upsampler, resi_connection,
    patch_norm``. MambaIRUNet: ``inp_channels, out_channels, dim, num_blocks, mlp_ratio,
    num_refinement_blocks, bias, dual_pixel_task``. Arguments that leave the state dict unchanged
    (``img_size``, ``img_range``, ``drop_path_rate``, ...) are not returned: their defaults are as good as
    any. ``mlp_ratio`` is the simplest ratio giving the stored width (1.2 for 72 = int(1.2 * 60)).

    Args:
        state_dict: ``{name: tensor}`` (``module.`` prefixes are ignored).
        explain: on failure, also name the keys and shapes in which the state dict differs from the closest
            official preset (:func:`explain_preset_mismatch`; builds the preset networks, ~1 s on a CPU).

    Raises:
        CheckpointError: not a MambaIR/MambaIRUNet state dict, or its keys/shapes are inconsistent (the
            message names them).
    """
    state_dict = _strip_module_prefix(state_dict)
    try:
        arch_type = detect_arch_type(state_dict)
    except CheckpointError as exc:
        if not explain:
            raise
        raise CheckpointError(f'{exc}; {explain_preset_mismatch(state_dict)}') from None
    if arch_type not in ('MambaIR', 'MambaIRUNet'):  # MambaIRv2: no such arch here, no preset to compare with
        raise CheckpointError(f'{arch_type} checkpoints are not supported: basicsr-mambair implements MambaIR and '
                              'MambaIRUNet only')
    try:
        if arch_type == 'MambaIR':
            return arch_type, _infer_mambair(state_dict)
        return arch_type, _infer_mambairunet(state_dict)
    except CheckpointError as exc:
        message = f'cannot infer the {arch_type} config: {exc}'
        if explain:
            message += f'; {explain_preset_mismatch(state_dict)}'
        raise CheckpointError(message) from None


# ----------------------------------------------------------------------------------------------------------------
# Comparing with the official presets (the one place that does)


def _arch_defaults(arch_type: str) -> dict[str, Any]:
    """Constructor defaults of a registered arch, tuples as lists (as option files and :func:`infer_config`)."""
    from basicsr.utils.registry import ARCH_REGISTRY  # after `import basicsr_mambair` (torchvision alias)

    params = inspect.signature(ARCH_REGISTRY.get(arch_type)).parameters.values()
    return {p.name: list(p.default) if isinstance(p.default, tuple) else p.default
            for p in params if p.default is not inspect.Parameter.empty}


def matching_presets(arch_type: str, config: Mapping[str, Any]) -> list[str]:
    """Names of the official presets whose network has exactly ``config`` (as returned by :func:`infer_config`).

    Several presets share one network (``colorDN_15/25/50``, ``CAR_10/30/40``): all are returned, in
    :data:`~basicsr_mambair.presets.PRESETS` order; ``[]`` for a config of no official task.
    """
    from ..presets import PRESETS

    names = []
    for name, preset in PRESETS.items():
        if preset.arch_type != arch_type:
            continue
        full = {**_arch_defaults(arch_type), **preset.kwargs}
        if all(full.get(key) == value for key, value in config.items()):
            names.append(name)
    return names


@functools.cache
def _preset_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(key, shape) of every entry of the state dict of the preset's network (built once on the CPU)."""
    from ..presets import PRESETS

    net = PRESETS[name].build()
    return tuple((key, tuple(value.shape)) for key, value in net.state_dict().items())


def explain_preset_mismatch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """How ``state_dict`` differs from the official preset it comes closest to, in one line.

    Closest = most keys with the preset's name and shape, among the presets of the state dict's arch family
    when its keys show one (else among all). The text names that preset (and those sharing its network),
    how many of its keys agree, and the first few wrongly shaped, missing and unexpected keys.
    """
    from ..presets import PRESETS

    state_dict = _strip_module_prefix(state_dict)
    ours = {key: tuple(value.shape) for key, value in state_dict.items()}
    try:
        family = detect_arch_type(state_dict)
    except CheckpointError:
        family = None
    candidates = [p for p in PRESETS.values() if p.arch_type == family] or list(PRESETS.values())
    networks: dict[tuple[str, str], list[str]] = {}  # presets sharing one network (colorDN_15/25/50) count once
    for preset in candidates:
        networks.setdefault((preset.arch_type, repr(preset.kwargs)), []).append(preset.name)
    groups = {_preset_shapes(names[0]): names for names in networks.values()}

    def score(shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[int, int]:
        agree = sum(ours.get(key) == shape for key, shape in shapes)
        return agree, -(len(shapes) + len(ours) - 2 * agree)  # most agreeing keys, then fewest others

    shapes, names = max(groups.items(), key=lambda item: score(item[0]))
    theirs = dict(shapes)
    label = '/'.join(names)
    wrong = [f'{k} {ours[k]} vs {v}' for k, v in theirs.items() if k in ours and ours[k] != v]
    missing = [k for k in theirs if k not in ours]
    unexpected = [k for k in ours if k not in theirs]
    parts = [f'closest official preset: {label} ({PRESETS[names[0]].arch_type}; {score(shapes)[0]} of its '
             f'{len(theirs)} keys agree)']
    if wrong:
        parts.append(f'wrongly shaped ({len(wrong)}; checkpoint vs preset): {_listing(wrong)}')
    if missing:
        parts.append(f'missing ({len(missing)}): {_listing(missing)}')
    if unexpected:
        parts.append(f'unexpected ({len(unexpected)}): {_listing(unexpected)}')
    return '; '.join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadReport:
    """What :func:`load_checked` did not load: keys of the network absent from the checkpoint, checkpoint keys
    the network does not have, and keys skipped for their shape as ``(key, checkpoint shape, network shape)``."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _listing(items: list[str]) -> str:
    shown = ', '.join(items[:_MAX_LISTED])
    return shown + (f', ... ({len(items) - _MAX_LISTED} more)' if len(items) > _MAX_LISTED else '')


def _config_differences(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], str | None]:
    """(human-readable differences between the checkpoint's and the network's config, checkpoint config text)."""
    try:
        ckpt_type, ckpt_cfg = infer_config(state_dict)
    except CheckpointError as exc:
        return [f'checkpoint not recognised ({exc})'], None
    ckpt_text = f'{ckpt_type}(' + ', '.join(f'{k}={v!r}' for k, v in ckpt_cfg.items()) + ')'
    net_type = type(net).__name__
    try:
        own_type, net_cfg = infer_config(net.state_dict())
    except CheckpointError:
        own_type, net_cfg = None, None
    if own_type != ckpt_type or net_cfg is None:
        return [f'the checkpoint is a {ckpt_type} checkpoint, the network is {net_type}'], ckpt_text
    diffs = [f'{key}: {ckpt_cfg[key]!r} in checkpoint, {net_cfg.get(key)!r} in network options'
             for key in ckpt_cfg if ckpt_cfg[key] != net_cfg.get(key)]
    return diffs, ckpt_text


def load_checked(net: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                 source: str = 'checkpoint', logger: logging.Logger | None = None) -> LoadReport:
    """Load ``state_dict`` into ``net`` with an explanatory error instead of PyTorch's key dump.

    Args:
        net: the network (unwrapped from DataParallel).
        state_dict: e.g. from :func:`read_state_dict` (``module.`` prefixes are stripped here too).
        strict: all keys and shapes must match (else :class:`CheckpointError`, nothing is loaded). With
            ``strict=False`` BasicSR's convention applies: keys whose shape differs are skipped, missing and
            unexpected keys are ignored -- each reported as a warning (how x3/x4 fine-tunes start from x2).
        source: how to name the checkpoint in messages (e.g. its path).
        logger: warnings go here (default: BasicSR's ``basicsr`` logger).

    Returns:
        A :class:`LoadReport` of what was not loaded (empty after a strict load).

    Raises:
        CheckpointError: ``strict`` and the checkpoint does not fit; the message names the configuration
            difference (from :func:`infer_config` of both sides) and the missing / unexpected / mis-shaped keys.
    """
    state_dict = _strip_module_prefix(state_dict)
    own = net.state_dict()
    report = LoadReport(
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
        mismatched=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                    if k in own and tuple(v.shape) != tuple(own[k].shape)],
    )
    net_name = type(net).__name__
    if not report.ok:
        diffs, ckpt_text = _config_differences(net, state_dict)
        lines = []
        if diffs:
            lines.append('config: ' + '; '.join(diffs))
        if report.missing:
            lines.append(f'missing keys ({len(report.missing)}): {_listing(report.missing)}')
        if report.unexpected:
            lines.append(f'unexpected keys ({len(report.unexpected)}): {_listing(report.unexpected)}')
        if report.mismatched:
            shapes = [f'{k} {tuple(c)} in checkpoint vs {tuple(n)} in network' for k, c, n in report.mismatched]
            lines.append(f'wrongly shaped keys ({len(shapes)}): {_listing(shapes)}')
        if strict:
            hint = f'the checkpoint fits {ckpt_text}; ' if ckpt_text else ''
            raise CheckpointError(
                f'{source} does not fit the {net_name} network:\n  ' + '\n  '.join(lines)
                + f'\n  ({hint}set network_g accordingly, or load with strict_load_g: false to skip the '
                'mismatched keys)')
        log = _logger(logger)
        log.warning(f'Loading {source} into {net_name} non-strictly:\n  ' + '\n  '.join(lines))
        for key, ckpt_shape, net_shape in report.mismatched:
            log.warning(f'Size mismatch for {key}: checkpoint {ckpt_shape}, network {net_shape}; skipped.')
    skipped = {k for k, _, _ in report.mismatched}
    to_load = OrderedDict((k, v) for k, v in state_dict.items() if k not in skipped)
    net.load_state_dict(to_load, strict=strict)
    return report


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path``: write beside it, then rename.

    A run killed while saving keeps the previous file (or none), so a resume never meets a
    truncated checkpoint.
    """
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
