"""Selective scan of Mamba (S6), exact on any device: one entry point, several backends.

For every batch b, channel d and state n (time index t)::

    h[t] = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * u[t] * B[g(d), n, t]      h[-1] = 0
    y[t] = sum_n C[g(d), n, t] * h[t, n]  (+ D[d] * u[t])  (* silu(z[t]))

with ``dt = softplus(delta + delta_bias)`` (softplus optional) and ``g(d) = d // (dim // G)`` the
group of channel d (MambaIR scans its 4 directions as G = 4 groups in one call).

Backends behind :func:`selective_scan` (argument, :func:`scan_backend`, or ``MAMBAIR_SCAN``), one module each:

- ``cuda`` (:mod:`.cuda`): ``mamba_ssm``'s kernel, imported lazily the first time CUDA tensors are scanned.
- ``compiled`` (:mod:`.compiled`): our C kernel for CPU tensors, forward and backward, built on first use
  with the system's C compiler; it computes in float32, so float64 calls run ``torch``.
- ``torch`` (:mod:`.chunked`): a chunked scan in pure PyTorch with its own backward, on any device.
- ``reference`` (:mod:`.reference`): a plain sequential loop with autograd through it; slow, for tests.

``auto`` picks ``cuda`` for CUDA tensors when ``mamba_ssm`` imports, ``compiled`` for CPU tensors where
the kernel builds, and ``torch`` otherwise. During ``torch.onnx.export`` a call without ``backend=`` becomes one
placeholder node instead (:mod:`.onnx_node`), which :mod:`basicsr_mambair.deploy` turns into standard ONNX ops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator

import torch
from torch import Tensor

from . import chunked, compiled, cuda, onnx_node
from .common import ScanOut
from .reference import selective_scan_reference

__all__ = ['BACKENDS', 'ENV_VAR', 'get_backend', 'reset', 'resolve_backend', 'scan_backend', 'selective_scan',
           'selective_scan_reference']

BACKENDS = ('auto', 'cuda', 'compiled', 'torch', 'reference')
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
    """The backend ``auto`` picks for tensors on ``tensor_device``: ``cuda``, ``compiled`` or ``torch``.

    Only asking about a CUDA device tries to import ``mamba_ssm``; only asking about the CPU builds the
    compiled kernel.
    """
    device = torch.device(tensor_device)
    if device.type == 'cuda' and cuda.unavailable_reason() is None:
        return 'cuda'
    if device.type == 'cpu' and compiled.unavailable_reason() is None:
        return 'compiled'
    return 'torch'


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call on ``device`` runs: ``backend``, else the :func:`scan_backend` override, else
    ``MAMBAIR_SCAN``, else ``auto``; a backend that cannot run there falls back to ``torch`` with one warning.
    The first use of each backend is logged (BasicSR's ``basicsr`` logger)."""
    name = _check_name(backend or _override or os.environ.get(ENV_VAR, '') or 'auto')
    note = ''
    if name == 'auto':
        name = get_backend(device)
        if device.type == 'cpu' and name == 'torch':
            note = f' (compiled CPU kernel unavailable: {compiled.unavailable_reason()})'
    elif name == 'cuda':
        if device.type != 'cuda':
            _warn_once('cuda-device', f'selective scan backend "cuda" needs CUDA tensors (got {device.type}); '
                                      'falling back to the pure PyTorch scan')
            name = 'torch'
        elif (reason := cuda.unavailable_reason()) is not None:
            _warn_once('cuda-import', f'selective scan backend "cuda": {reason}; '
                                      'falling back to the pure PyTorch scan')
            name = 'torch'
    elif name == 'compiled':
        if device.type != 'cpu':
            _warn_once('compiled-device', f'selective scan backend "compiled" needs CPU tensors (got '
                                          f'{device.type}); falling back to the pure PyTorch scan')
            name = 'torch'
        elif (reason := compiled.unavailable_reason()) is not None:
            _warn_once('compiled-build', f'selective scan backend "compiled" is unavailable: {reason}; '
                                         'falling back to the pure PyTorch scan')
            name = 'torch'
    if name not in _logged:
        _logged.add(name)
        _logger.info('Selective scan backend: %s%s', name, note)
    return name


def reset() -> None:
    """Forget the one-time log/warning records, the kernel build and the ``mamba_ssm`` import (for tests)."""
    _logged.clear()
    _warned.clear()
    cuda.reset()
    compiled.reset()


_IMPLEMENTATIONS = {'cuda': cuda.scan, 'compiled': compiled.scan, 'torch': chunked.scan,
                    'reference': selective_scan_reference}


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str | None = None) -> ScanOut:
    """Selective scan with the semantics of ``mamba_ssm``'s ``selective_scan_fn``.

    Args:
        u, delta: (batch, dim, L) input and time step (before ``delta_bias``/softplus).
        A: (dim, N) real state matrix (diagonal per channel; negative for a decaying state).
        B, C: (batch, G, N, L) with dim divisible by G (channel block k uses group k), or (batch, N, L).
        D: (dim,) skip connection; z: (batch, dim, L) gate, output multiplied by silu(z).
        delta_bias: (dim,) added to delta; delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return the final state h[L-1], (batch, dim, N).
        backend: 'auto' | 'cuda' | 'compiled' | 'torch' | 'reference'; None: :func:`scan_backend` override, else
            the ``MAMBAIR_SCAN`` environment variable, else 'auto' (and an ONNX node during ``torch.onnx.export``).

    Returns:
        y (batch, dim, L) in u's dtype, computed in float32 (float64 for float64 inputs); with
        ``return_last_state`` also the last state in the computation dtype.
    """
    if backend is None and torch.onnx.is_in_onnx_export():  # no backend traces into a usable ONNX graph
        return onnx_node.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    impl = _IMPLEMENTATIONS[resolve_backend(backend, u.device)]
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
