"""Reading, checked loading and atomic saving of checkpoints, with one clear error per failure.

* :func:`read_state_dict` -- ``torch.load(weights_only=True)`` (never executes pickled code) or a
  ``.safetensors`` file, picks the ``params`` / ``params_ema`` entry like BasicSR, strips ``module.`` prefixes
  (:func:`read_checkpoint`: the whole file).
* :func:`load_checked` -- ``load_state_dict`` whose failure names the configuration difference
  (e.g. ``embed_dim: 180 in checkpoint, 60 in network options``, from the arch support modules'
  config inference) and the offending keys; with ``strict=False`` it follows BasicSR (keys of another shape
  are skipped with a warning).
* :func:`check_finite` -- weights with NaN/Inf are refused (by :func:`load_checked` too), naming the tensor.
* :func:`save_atomic` -- ``torch.save`` that never leaves a partial file.

Which family a state dict is and its configuration: :mod:`basicsr_mambair.archs.support`; which official
preset it matches: :mod:`basicsr_mambair.presets`.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..archs.support import infer_config
from ..errors import CheckpointError
from .files import atomic_write_bytes
from .safetensors_io import is_safetensors, load_safetensors

__all__ = ['CheckpointError', 'LoadReport', 'check_finite', 'checkpoint_entries', 'load_checked', 'read_checkpoint',
           'read_state_dict', 'save_atomic', 'select_state_dict', 'short_list', 'strip_module_prefix']

_MAX_LISTED = 5  # keys shown per category in error messages


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


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds, as BasicSR does."""
    return OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v) for k, v in state_dict.items())


def select_state_dict(obj: Any, param_key: str | None = 'params', source: str = 'the checkpoint',
                      logger: logging.Logger | None = None) -> OrderedDict[str, torch.Tensor]:
    """The network weights in a loaded checkpoint ``obj``, as BasicSR's ``load_network`` picks them.

    ``obj[param_key]``, else ``obj['params']`` (reported to ``logger``), else ``obj`` itself when it is a bare
    state dict; ``module.`` prefixes stripped. ``source`` names the checkpoint in errors.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{source} holds a {type(obj).__name__}, not a state dict or a dict of state dicts')
    if param_key is not None and isinstance(obj.get(param_key), Mapping):
        state_dict = obj[param_key]
    elif param_key is not None and param_key != 'params' and isinstance(obj.get('params'), Mapping):
        _logger(logger).info(f'Loading: {param_key} does not exist, use params.')
        state_dict = obj['params']
    elif _is_tensor_mapping(obj):
        state_dict = obj
    else:
        entries = ', '.join(repr(k) for k in list(obj)[:10])
        raise CheckpointError(f'{source} has no state dict under {param_key!r} and is not a bare state dict; '
                              f'its top-level entries: {entries} (choose one with param_key / path.param_key_g)')
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'{source}: the state dict has non-tensor entries: {", ".join(bad[:_MAX_LISTED])}')
    return strip_module_prefix(state_dict)


def checkpoint_entries(obj: Any, source: str = 'the checkpoint') -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                        list[str]]:
    """(``{entry: state_dict}``, names of the other entries) of a loaded checkpoint.

    The entries are the top-level values that are state dicts (``params``, ``params_ema``, ...); a bare state
    dict is the entry ``params`` (BasicSR's name). Other values (e.g. an iteration count) are listed, not kept.
    """
    if _is_tensor_mapping(obj):
        return {'params': dict(obj)}, []
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{source} holds a {type(obj).__name__}, not a state dict or a dict of state dicts')
    entries = {str(k): dict(v) for k, v in obj.items() if _is_tensor_mapping(v)}
    if not entries:
        raise CheckpointError(f'{source} holds no state dict (top-level entries: '
                              f'{", ".join(repr(k) for k in list(obj)[:10]) or "none"})')
    return entries, [str(k) for k in obj if str(k) not in entries]


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The whole checkpoint in a file, read safely: ``torch.load(weights_only=True)`` (never executes pickled
    code), or a ``.safetensors`` file (:mod:`.safetensors_io`: ``{entry: state_dict}`` or a bare state dict).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt/truncated/not a checkpoint, or contains pickled code or objects
            (refused: ``weights_only=True``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if is_safetensors(path):
        return load_safetensors(path)
    try:
        with warnings.catch_warnings():
            # Harmless notice for checkpoints pickled with protocol > 2.
            warnings.filterwarnings('ignore', message='.*pickle protocol.*')
            return torch.load(path, map_location='cpu', weights_only=True)
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


def read_state_dict(path: str | os.PathLike, param_key: str | None = 'params',
                    logger: logging.Logger | None = None) -> OrderedDict[str, torch.Tensor]:
    """Read the network weights of a checkpoint file, safely.

    Args:
        path: a file written by ``torch.save``, or a ``.safetensors`` file (see :func:`read_checkpoint`).
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
    return select_state_dict(read_checkpoint(path), param_key, os.fspath(path), logger)


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


def short_list(items: list[str]) -> str:
    """The first few ``items`` joined with commas, and how many more there are (for one-line messages)."""
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


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = 'checkpoint') -> None:
    """Refuse weights holding NaN or Inf: they give black or NaN images, never a restoration.

    Raises :class:`CheckpointError` naming the first such tensor and how many values are broken.
    """
    for key, value in state_dict.items():
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = value.numel() - int(finite.sum())
                others = sum(1 for v in state_dict.values() if (v.is_floating_point() or v.is_complex())
                             and not bool(torch.isfinite(v).all())) - 1
                more = f' (and {others} more tensors)' if others else ''
                raise CheckpointError(f'{source}: tensor {key} holds {bad} NaN/Inf values of {value.numel()}{more}; '
                                      'these weights are broken (a diverged training?) and cannot restore images')


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
        CheckpointError: a tensor holds NaN/Inf (:func:`check_finite`); or ``strict`` and the checkpoint does
            not fit: the message names the configuration difference (from :func:`infer_config` of both sides) and
            the missing / unexpected / mis-shaped keys.
    """
    state_dict = strip_module_prefix(state_dict)
    check_finite(state_dict, source)
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
            lines.append(f'missing keys ({len(report.missing)}): {short_list(report.missing)}')
        if report.unexpected:
            lines.append(f'unexpected keys ({len(report.unexpected)}): {short_list(report.unexpected)}')
        if report.mismatched:
            shapes = [f'{k} {tuple(c)} in checkpoint vs {tuple(n)} in network' for k, c, n in report.mismatched]
            lines.append(f'wrongly shaped keys ({len(shapes)}): {short_list(shapes)}')
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
    """``torch.save`` that never leaves a partial file at ``path``: serialise, write beside it, fsync, check the
    size on disk, then rename.

    A run killed while saving, or a full disk, keeps the previous file (or none), so a resume never meets a
    truncated checkpoint; the failure is an ``OSError`` naming ``path``.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())
