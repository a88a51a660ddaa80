"""Selective scan of Mamba (S6), exact on any device: one entry point, several backends.

For every batch b, channel d and state n (time index t)::

    h[t] = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * u[t] * B[g(d), n, t]      h[-1] = 0
    y[t] = sum_n C[g(d), n, t] * h[t, n]  (+ D[d] * u[t])  (* silu(z[t]))

with ``dt = softplus(delta + delta_bias)`` (softplus optional) and ``g(d) = d // (dim // G)`` the
group of channel d (MambaIR scans its 4 directions as G = 4 groups in one call).

Backends behind :func:`selective_scan` (argument, :func:`scan_backend`, or ``MAMBAIR_SCAN``), one module each:

- ``cuda`` (:mod:`.cuda`): ``mamba_ssm``'s kernel, imported lazily the first time CUDA tensors are scanned.
- ``compiled`` (:mod:`.compiled`): our C kernel for CPU tensors, forward and backward, built on first use
  with the system's C compiler; it computes in float32, so float64 calls run ``torch``. Its fused entry
  points (:mod:`.fused`) walk several scan orders of position-major inputs in place: SS2D's four
  directions (:func:`uses_fused_kernel` tells SS2D when to call them) and MambaIRv2's permuted scan
  (:func:`permuted_selective_scan`). ``compiled-unfused`` is the same kernel without them: SS2D then
  feeds it ``cross_scan`` copies (the code before the fused kernel, kept for comparison).
- ``torch`` (:mod:`.chunked`): a chunked scan in pure PyTorch with its own backward, on any device.
- ``reference`` (:mod:`.reference`): a plain sequential loop with autograd through it; slow, for tests.

``auto`` picks ``cuda`` for CUDA tensors when ``mamba_ssm`` imports, ``compiled`` for CPU tensors where
the kernel builds, and ``torch`` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator

import torch
from torch import Tensor

from . import chunked, compiled, cuda, fused
from .common import ScanOut, compute_dtype
from .orders import ordered_scan
from .reference import selective_scan_reference

__all__ = ['BACKENDS', 'ENV_VAR', 'get_backend', 'permuted_selective_scan', 'reset', 'resolve_backend',
           'scan_backend', 'selective_scan', 'selective_scan_reference', 'uses_fused_kernel']

BACKENDS = ('auto', 'cuda', 'compiled', 'compiled-unfused', 'torch', 'reference')
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
    """Forget the one-time log/warning records, the kernel build and the ``mamba_ssm`` import (for tests)."""
    _logged.clear()
    _warned.clear()
    cuda.reset()
    compiled.reset()


_IMPLEMENTATIONS = {'cuda': cuda.scan, 'compiled': compiled.scan, 'compiled-unfused': compiled.scan,
                    'torch': chunked.scan, 'reference': selective_scan_reference}


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
        backend: one of :data:`BACKENDS` ('compiled-unfused' is 'compiled' here); None: :func:`scan_backend`
            override, else the ``MAMBAIR_SCAN`` environment variable, else 'auto'.

    Returns:
        y (batch, dim, L) in u's dtype, computed in float32 (float64 for float64 inputs); with
        ``return_last_state`` also the last state in the computation dtype.
    """
    impl = _IMPLEMENTATIONS[resolve_backend(backend, u.device)]
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def uses_fused_kernel(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> bool:
    """Whether a scan of ``dtype`` tensors on ``device`` runs the fused kernel (:mod:`.fused`): the backend
    (as :func:`selective_scan` resolves it) is ``compiled`` and the computation dtype float32."""
    return resolve_backend(backend, device) == 'compiled' and compute_dtype(dtype) == torch.float32


def permuted_selective_scan(u: Tensor, proj: Tensor, dt_weight: Tensor, dt_bias: Tensor | None, A: Tensor,
                            D: Tensor | None, perm: Tensor, c_add: Tensor | None = None, delta_softplus: bool = True,
                            backend: str | None = None) -> Tensor:
    """One selective scan over the positions in the order ``perm`` (MambaIRv2), written back at the positions.

    Shapes as :func:`.fused.scan_permuted`: u (batch, L, dim) and proj (batch, L, R + 2N) in position order,
    dt_weight (1, dim, R), dt_bias (1, dim), A (dim, N), D (dim,), perm (batch, L) int64, c_add (batch, L, N)
    added to C at step t. The fused kernel gathers and scatters in place; other backends get sorted copies
    (:func:`.orders.ordered_scan`). Returns (batch, L, dim) in the computation dtype (float32, or float64).
    """
    name = resolve_backend(backend, u.device)
    if name == 'compiled' and compute_dtype(u.dtype) == torch.float32:
        return fused.scan_permuted(u, proj, dt_weight, dt_bias, A, D, perm, c_add, delta_softplus)
    fused.check_permuted_shapes(u, proj, dt_weight, dt_bias, A, D, perm, c_add)
    cd = compute_dtype(u.dtype)

    def to_cd(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(cd)

    return ordered_scan(u.to(cd), proj[:, :, None].to(cd), dt_weight.reshape(1, *dt_weight.shape[-2:]).to(cd),
                        None if dt_bias is None else dt_bias.reshape(1, -1).to(cd), A.to(cd), to_cd(D),
                        perm[:, None], to_cd(c_add), delta_softplus,
                        scan=lambda *a, **k: selective_scan(*a, backend=name, **k))
