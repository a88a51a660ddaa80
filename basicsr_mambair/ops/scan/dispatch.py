"""Choosing the scan backend: the argument, :func:`scan_backend`, ``MAMBAIR_SCAN`` or ``auto``, with one-warning
fallbacks and one log line per backend; :func:`run` calls the chosen backend's ``scan``. :func:`observe` shows
every call's shapes to a callback (operation counting, :mod:`basicsr_mambair.profile`); on ``meta`` tensors
:func:`run` only propagates shapes."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from . import chunked, compiled, cuda, fused, triton
from .common import ScanOut, compute_dtype, needs_graph
from .reference import selective_scan_reference

__all__ = ['BACKENDS', 'ENV_VAR', 'ScanCall', 'get_backend', 'observe', 'reset', 'resolve_backend', 'run',
           'scan_backend']

BACKENDS = ('auto', 'cuda', 'triton', 'compiled', 'compiled-unfused', 'torch', 'reference')
ENV_VAR = 'MAMBAIR_SCAN'

_logger = logging.getLogger('basicsr')
_override: str | None = None
_logged: set = set()
_warned: set = set()


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f'unknown selective scan backend {name!r}; expected one of {BACKENDS}')
    return key


@contextlib.contextmanager
def scan_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` (one of :data:`BACKENDS`) for calls without ``backend=`` inside the block.

    A process-wide override (not thread-safe); it takes precedence over ``MAMBAIR_SCAN``.
    """
    global _override
    previous, _override = _override, _check_name(name)
    try:
        yield
    finally:
        _override = previous


def get_backend(tensor_device: torch.device | str) -> str:
    """The backend ``auto`` picks for tensors on ``tensor_device``: ``cuda``, ``triton``, ``compiled`` or ``torch``.

    Only asking about a CUDA device tries to import ``mamba_ssm`` (then Triton); only asking about the CPU
    builds the compiled kernel.
    """
    device = torch.device(tensor_device)
    if device.type == 'cuda':
        if cuda.unavailable_reason() is None:
            return 'cuda'
        if triton.unavailable_reason() is None:
            return 'triton'
    if device.type == 'cpu' and compiled.unavailable_reason() is None:
        return 'compiled'
    return 'torch'


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call on ``device`` runs: ``backend``, else the :func:`scan_backend` override, else
    ``MAMBAIR_SCAN``, else ``auto``; a backend that cannot run there falls back with one warning, to ``torch``
    (``cuda`` without ``mamba_ssm``: to what ``auto`` picks, ``triton`` where it runs). The first use of each
    backend is logged (BasicSR's ``basicsr`` logger)."""
    name = _check_name(backend or _override or os.environ.get(ENV_VAR, '') or 'auto')
    note = ''
    if name == 'auto':
        name = get_backend(device)
        if device.type == 'cpu' and name == 'torch':
            note = f' (compiled CPU kernel unavailable: {compiled.unavailable_reason()})'
        elif device.type == 'cuda' and name == 'torch':
            note = f' ({cuda.unavailable_reason()}; triton unavailable: {triton.unavailable_reason()})'
        elif name == 'triton':
            note = f' ({cuda.unavailable_reason()})'
    elif name == 'cuda':
        if device.type != 'cuda':
            _warn_once('cuda-device', f'selective scan backend "cuda" needs CUDA tensors (got {device.type}); '
                                      'falling back to the pure PyTorch scan')
            name = 'torch'
        elif (reason := cuda.unavailable_reason()) is not None:  # what auto runs instead: triton or torch
            name = get_backend(device)
            _warn_once('cuda-import', f'selective scan backend "cuda": {reason}; falling back to the '
                                      + ('triton scan' if name == 'triton' else 'pure PyTorch scan'))
    elif name == 'triton':
        if device.type != 'cuda':
            _warn_once('triton-device', f'selective scan backend "triton" needs CUDA tensors (got {device.type}); '
                                        'falling back to the pure PyTorch scan')
            name = 'torch'
        elif (reason := triton.unavailable_reason()) is not None:
            _warn_once('triton-unavailable', f'selective scan backend "triton" is unavailable: {reason}; '
                                             'falling back to the pure PyTorch scan')
            name = 'torch'
    elif name in ('compiled', 'compiled-unfused'):
        if device.type != 'cpu':
            _warn_once('compiled-device', f'selective scan backend "{name}" needs CPU tensors (got '
                                          f'{device.type}); falling back to the pure PyTorch scan')
            name = 'torch'
        elif (reason := compiled.unavailable_reason()) is not None:
            _warn_once('compiled-build', f'selective scan backend "{name}" is unavailable: {reason}; '
                                         'falling back to the pure PyTorch scan')
            name = 'torch'
    if name not in _logged:
        _logged.add(name)
        _logger.info('Selective scan backend: %s%s', name, note)
    return name


def reset() -> None:
    """Forget the one-time log/warning records, the kernel build and its checks, the Triton check and the
    ``mamba_ssm`` import (for tests)."""
    _logged.clear()
    _warned.clear()
    cuda.reset()
    compiled.reset()
    fused.reset()
    triton.reset()


@dataclass(frozen=True)
class ScanCall:
    """The sizes of one scan call: u is (batch, dim, length), A is (dim, state); ``skip`` / ``gate``: D / z given."""

    batch: int
    dim: int
    length: int
    state: int
    skip: bool
    gate: bool


_observers: list[Callable[[ScanCall], None]] = []


@contextlib.contextmanager
def observe(callback: Callable[[ScanCall], None]) -> Iterator[None]:
    """Call ``callback`` with the :class:`ScanCall` of every scan run inside the block (process-wide, like
    :func:`scan_backend`; eager and compiled calls alike)."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


_IMPLEMENTATIONS = {'cuda': cuda.scan, 'triton': triton.scan, 'compiled': compiled.scan,
                    'compiled-unfused': compiled.scan, 'torch': chunked.scan, 'reference': selective_scan_reference}


def run(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
        delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool, backend: str | None) -> ScanOut:
    """The eager scan: the resolved backend's implementation (what :func:`selective_scan` runs outside
    ``torch.compile``, and the custom op at run time). Meta tensors outside autograd get outputs of the right
    shapes and dtypes at once (counting a network's operations on the meta device); with autograd the ``torch``
    backend, which is device-agnostic, runs on them as on any device."""
    if _observers:
        call = ScanCall(*u.shape, A.shape[1], D is not None, z is not None)
        for callback in _observers:
            callback(call)
    if u.device.type == 'meta' and not needs_graph(u, delta, A, B, C, D, z, delta_bias):
        y = torch.empty_like(u, memory_format=torch.contiguous_format)
        return (y, u.new_empty(u.shape[:2] + A.shape[1:], dtype=compute_dtype(u.dtype))) if return_last_state else y
    impl = _IMPLEMENTATIONS[resolve_backend(backend, u.device)]
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
