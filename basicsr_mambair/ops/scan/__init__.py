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
  with the system's C compiler; it computes in float32, so float64 calls run ``torch``. Its fused entry
  points (:mod:`.fused`) walk several scan orders of position-major inputs in place: SS2D's four
  directions (:func:`uses_fused_kernel` tells SS2D when to call them) and MambaIRv2's permuted scan
  (:func:`permuted_selective_scan`). ``compiled-unfused`` is the same kernel without them: SS2D then
  feeds it ``cross_scan`` copies (the code before the fused kernel, kept for comparison).
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

from ..linear import is_tracing
from . import chunked, compiled, cuda, fused, onnx_node, op, triton  # noqa: F401  (the backends, as attributes)
from .common import ScanOut, compute_dtype
from .dispatch import BACKENDS, ENV_VAR, get_backend, reset, resolve_backend, run, scan_backend
from .orders import ordered_scan
from .reference import selective_scan_reference

__all__ = ['BACKENDS', 'ENV_VAR', 'get_backend', 'permuted_selective_scan', 'reset', 'resolve_backend',
           'scan_backend', 'selective_scan', 'selective_scan_reference', 'uses_fused_kernel']


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


def uses_fused_kernel(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> bool:
    """Whether a scan of ``dtype`` tensors on ``device`` runs the fused kernel (:mod:`.fused`): the backend
    (as :func:`selective_scan` resolves it) is ``compiled``, the computation dtype float32, the fused entry
    points passed their self-check, and neither
    ``torch.onnx.export`` nor ``torch.compile`` is tracing (both take the unfused path's single op)."""
    if is_tracing():  # ONNX export and torch.compile need the one-call graph of selective_scan
        return False
    return (resolve_backend(backend, device) == 'compiled' and compute_dtype(dtype) == torch.float32
            and fused.unavailable_reason() is None)


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
    if name == 'compiled' and compute_dtype(u.dtype) == torch.float32 and fused.unavailable_reason() is None:
        return fused.scan_permuted(u, proj, dt_weight, dt_bias, A, D, perm, c_add, delta_softplus)
    fused.check_permuted_shapes(u, proj, dt_weight, dt_bias, A, D, perm, c_add)
    cd = compute_dtype(u.dtype)

    def to_cd(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(cd)

    return ordered_scan(u.to(cd), proj[:, :, None].to(cd), dt_weight.reshape(1, *dt_weight.shape[-2:]).to(cd),
                        None if dt_bias is None else dt_bias.reshape(1, -1).to(cd), A.to(cd), to_cd(D),
                        perm[:, None], to_cd(c_add), delta_softplus,
                        scan=lambda *a, **k: selective_scan(*a, backend=name, **k))
