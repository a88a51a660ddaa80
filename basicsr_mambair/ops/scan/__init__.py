"""Selective scan of Mamba (S6), exact on any device: one entry point, several backends.

For every batch b, channel d and state n (time index t)::

    h[t] = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * u[t] * B[g(d), n, t]      h[-1] = 0
    y[t] = sum_n C[g(d), n, t] * h[t, n]  (+ D[d] * u[t])  (* silu(z[t]))

with ``dt = softplus(delta + delta_bias)`` (softplus optional) and ``g(d) = d // (dim // G)`` the
group of channel d (MambaIR scans its 4 directions as G = 4 groups in one call).

Backends behind :func:`selective_scan` (argument, :func:`scan_backend`, or ``MAMBAIR_SCAN``), one module each:

- ``cuda`` (:mod:`.cuda`): ``mamba_ssm``'s kernel, imported lazily the first time CUDA tensors are scanned.
- ``triton`` (:mod:`.triton`): our Triton kernels for CUDA tensors, forward and backward, compiled and checked
  on first use (any GPU Triton supports; no ``mamba_ssm`` build needed).
- ``compiled`` (:mod:`.compiled`): our C kernel for CPU tensors, forward and backward, built on first use
  with the system's C compiler; it computes in float32, so float64 calls run ``torch``.
- ``torch`` (:mod:`.chunked`): a chunked scan in pure PyTorch with its own backward, on any device.
- ``reference`` (:mod:`.reference`): a plain sequential loop with autograd through it; slow, for tests.

``auto`` picks, for CUDA tensors, ``cuda`` when ``mamba_ssm`` imports, else ``triton`` where it runs; for CPU
tensors ``compiled`` where the kernel builds; and ``torch`` otherwise.

Under ``torch.compile`` the scan is one opaque ``torch.library`` custom op (:mod:`.op`) that calls the same
dispatcher (:mod:`.dispatch`) at run time, so the graph does not break on it whatever the backend; eager calls
skip the op. During ``torch.onnx.export`` a call without ``backend=`` becomes one placeholder node instead
(:mod:`.onnx_node`), which :mod:`basicsr_mambair.deploy` turns into standard ONNX ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import chunked, compiled, cuda, onnx_node, op, triton  # noqa: F401  (the backends, as attributes)
from .common import ScanOut
from .dispatch import BACKENDS, ENV_VAR, get_backend, reset, resolve_backend, run, scan_backend
from .reference import selective_scan_reference

__all__ = ['BACKENDS', 'ENV_VAR', 'get_backend', 'reset', 'resolve_backend', 'scan_backend', 'selective_scan',
           'selective_scan_reference']


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
        backend: 'auto' | 'cuda' | 'triton' | 'compiled' | 'torch' | 'reference'; None: :func:`scan_backend`
            override, else the ``MAMBAIR_SCAN`` environment variable, else 'auto' (and an ONNX node during
            ``torch.onnx.export``).

    Returns:
        y (batch, dim, L) in u's dtype, computed in float32 (float64 for float64 inputs); with
        ``return_last_state`` also the last state in the computation dtype.
    """
    if backend is None and torch.onnx.is_in_onnx_export():  # no backend traces into a usable ONNX graph
        return onnx_node.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if op.compiling():  # one opaque node in the graph; the backend is resolved when it runs
        return op.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend)
    return run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend)
