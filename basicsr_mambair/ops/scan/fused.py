"""Fused scans of the ``compiled`` backend: scan_fused.c walks several orders over position-major inputs.

The C kernel (built with the flat one by :mod:`.compiled`) reads the un-expanded (batch, P, dim) input and
each position's projection (dt_low, B, C of every direction) in place and adds every direction's output
into one (batch, P, dim) result; see :func:`~.orders.ordered_scan` for the computation it performs.

- :func:`scan_cross`: MambaIR's SS2D, four directions over an H x W grid (no ``cross_scan`` copies, no
  flips, no ``cross_merge``, no 4x delta tensor).
- :func:`scan_permuted`: one direction over a permutation of the positions (MambaIRv2's semantically
  sorted tokens; the gather into sorted order and the scatter back happen inside the kernel).

Both compute in float32, have the kernel's backward (states recomputed per tile from the tile starts the
forward saved), and raise
:class:`KernelUnavailable` where the kernel cannot be built or these entry points fail their own self-check
(:func:`check_kernel`, run by :func:`load` before first use; then SS2D keeps the unfused path).
"""

from __future__ import annotations

import ctypes
import math
from typing import Tuple

import torch
from torch import Tensor

from ...errors import KernelUnavailable
from . import common, compiled
from .common import needs_graph
from .orders import NUM_CROSS_DIRECTIONS, check_permutation, cross_positions, ordered_scan

__all__ = ['check_kernel', 'scan_cross', 'scan_permuted']

ORDER_CROSS, ORDER_PERM = 0, 1  # enum of scan_fused.c


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """float32 with a contiguous last dimension (the kernel reads other dimensions through their strides)."""
    if t is None:
        return None
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


class _Call:
    """One fused scan's inputs in the kernel's layout and the argument struct pointing at them.

    u (batch, P, dim); proj (batch, P, K, R + 2N); wdt (K, dim, R); bias (K, dim) or None; A (K * dim, N);
    D (K * dim,) or None; cadd (batch, L, N) or None; perm (batch, L) int64 (ORDER_PERM) or None.
    """

    def __init__(self, lib: ctypes.CDLL, u: Tensor, proj: Tensor, wdt: Tensor, bias: Tensor | None, A: Tensor,
                 D: Tensor | None, cadd: Tensor | None, perm: Tensor | None, height: int, width: int,
                 softplus: bool):
        self.lib = lib
        batch, positions, dim = u.shape
        k_dirs, self.n, rank = proj.shape[2], A.shape[1], wdt.shape[-1]
        self.shape, self.dirs, self.rank = (batch, positions, dim), k_dirs, rank
        self.elems = batch * k_dirs * dim * positions * self.n
        self.u, self.proj, self.cadd = _unit_stride(u), _unit_stride(proj), _unit_stride(cadd)
        self.wdt = wdt.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.A = A.float().contiguous()
        self.A2 = self.A * compiled.LOG2E
        self.D = None if D is None else D.float().contiguous()
        self.perm = None if perm is None else perm.contiguous()
        c_strides = (0, 0) if self.cadd is None else (self.cadd.stride(0), self.cadd.stride(1))
        self.args = compiled.FusedArgs(
            *(compiled.ptr(t) for t in (self.u, self.proj, self.cadd, self.wdt, self.bias, self.A2, self.A, self.D,
                                        self.perm)), None,
            batch, dim, self.n, rank, k_dirs, positions, height, width,
            ORDER_PERM if perm is not None else ORDER_CROSS, int(softplus),
            self.u.stride(0), self.u.stride(1), self.proj.stride(0), self.proj.stride(1), self.proj.stride(2),
            *c_strides, 1)

    def set(self, **tensors: Tensor | None) -> None:
        """Point the struct's output / gradient fields at ``tensors`` (kept alive here)."""
        for name, t in tensors.items():
            setattr(self, f'_{name}', t)
            setattr(self.args, name, compiled.ptr(t))

    def forward(self, save_starts: bool = False) -> Tensor:
        """y (batch, P, dim) float32: the directions' outputs with D u, summed. ``save_starts``: also keep
        the state at every tile start in ``self.starts`` (the backward's input; about N * K / 64 floats per
        input value)."""
        batch, positions, dim = self.shape
        y = torch.empty(batch, positions, dim)
        if not y.numel():
            return y
        if save_starts:
            self.set(starts=torch.empty(self.lib.mambair_fused_starts_size(ctypes.byref(self.args))))
        self.set(y=y)
        # A work unit is a range of channel blocks of one batch element: the whole element where the batch
        # gives every thread work (the kernel reuses each position's rows across blocks), else split.
        blocks = -(-dim // compiled.LANES)
        per_batch = min(blocks, -(-compiled.workers(self.elems) // batch))
        self.args.unit_blocks = -(-blocks // per_batch)
        units = batch * -(-blocks // self.args.unit_blocks)
        status = compiled.parallel(self.lib.mambair_fused_forward, units, ctypes.byref(self.args), elems=self.elems)
        if any(status):
            raise MemoryError('fused selective scan: no memory for its per-thread buffers')
        return y

    @property
    def starts(self) -> Tensor | None:
        return getattr(self, '_starts', None)

    def backward(self, dy: Tensor, starts: Tensor | None = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """du (batch, K, P, dim) per direction without the D term; dproj (batch, P, K, R + 2N);
        dwdt (K, dim, R), dbias (K, dim) and dA (K * dim, N) summed over the batch. ``starts``: those of a
        forward with the same inputs (default: this call's own)."""
        batch, positions, dim = self.shape
        k_dirs, n, rank = self.dirs, self.n, self.rank
        new = torch.empty if self.elems else torch.zeros  # nothing to scan: zero gradients
        grads = {'du': new(batch, k_dirs, positions, dim), 'dproj': new(batch, positions, k_dirs, rank + 2 * n),
                 'dwdt': new(batch, k_dirs, dim, rank), 'dbias': new(batch, k_dirs, dim),
                 'dA': new(batch, k_dirs * dim, n)}
        if self.elems:
            starts = self.starts if starts is None else starts
            if starts is None or starts.data_ptr() % 64:  # the kernel loads them as aligned vectors
                raise ValueError('fused scan backward: needs the 64-byte aligned tile starts of its forward')
            self.set(starts=starts, dy=dy.float().contiguous(), **grads)
            status = compiled.parallel(self.lib.mambair_fused_backward, batch * k_dirs, ctypes.byref(self.args),
                                       elems=self.elems)
            if any(status):
                raise MemoryError('fused selective scan backward: no memory for its per-thread buffers')
        return grads['du'], grads['dproj'], grads['dwdt'].sum(0), grads['dbias'].sum(0), grads['dA'].sum(0)


class _FusedScan(torch.autograd.Function):
    """y of :class:`_Call` with the kernel's backward (from the tile starts its forward saved); D and the C
    addend get theirs here."""

    @staticmethod
    def forward(ctx, u: Tensor, proj: Tensor, wdt: Tensor, bias: Tensor | None, A: Tensor, D: Tensor | None,
                cadd: Tensor | None, perm: Tensor | None, height: int, width: int, softplus: bool) -> Tensor:
        call = _Call(load(), u, proj, wdt, bias, A, D, cadd, perm, height, width, softplus)
        y = call.forward(save_starts=True)
        ctx.save_for_backward(u, proj, wdt, bias, A, D, cadd, perm, call.starts)
        ctx.config = height, width, softplus
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, proj, wdt, bias, A, D, cadd, perm, starts = ctx.saved_tensors
        call = _Call(load(), u, proj, wdt, bias, A, D, cadd, perm, *ctx.config)
        dy = dy.float().contiguous()
        du, dproj, dwdt, dbias, dA = call.backward(dy, starts)
        du = du.sum(1)
        dD = None
        if D is not None:  # every direction adds D_k u at the same positions
            du = du.addcmul_(dy, D.float().view(call.dirs, -1).sum(0))
            dD = (dy * call.u).sum((0, 1)).repeat(call.dirs)
        dcadd = None
        if cadd is not None:  # C at step t = C(position perm[t]) + cadd[t]
            n = call.n
            dcadd = dproj[:, :, 0, -n:].gather(1, perm[..., None].expand(-1, -1, n))
        grads = [(du, u), (dproj, proj), (dwdt, wdt), (dbias, bias), (dA, A), (dD, D), (dcadd, cadd)]
        return (*(None if t is None else g.to(t.dtype) for g, t in grads), None, None, None, None)


_checked: bool = False
_error: KernelUnavailable | None = None


def load() -> ctypes.CDLL:
    """The compiled kernel library (:func:`.compiled.load`) once its fused entry points passed
    :func:`check_kernel` (checked on the first call; the outcome is kept)."""
    global _checked, _error
    lib = compiled.load()
    if not _checked and _error is None:
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the first scan may come from inference code
                check_kernel(lib)
            _checked = True
        except KernelUnavailable as exc:
            _error = exc
    if _error is not None:
        raise _error
    return lib


def unavailable_reason() -> str | None:
    """Why the fused entry points cannot be used here (one line), or None when they can."""
    return common.unavailable_reason(load)


def reset() -> None:
    """Forget the self-check's outcome (for tests)."""
    global _checked, _error
    _checked, _error = False, None


def _scan(u: Tensor, proj: Tensor, wdt: Tensor, bias: Tensor | None, A: Tensor, D: Tensor | None,
          cadd: Tensor | None, perm: Tensor | None, height: int, width: int, softplus: bool) -> Tensor:
    devices = {t.device.type for t in (u, proj, wdt, bias, A, D, cadd, perm) if t is not None}
    if devices != {'cpu'}:
        raise ValueError(f'the fused scan runs on CPU tensors only; got tensors on {sorted(devices)}')
    lib = load()
    if needs_graph(u, proj, wdt, bias, A, D, cadd):  # the profiler shows it as _FusedScan(Backward)
        return _FusedScan.apply(u, proj, wdt, bias, A, D, cadd, perm, height, width, softplus)
    with torch.profiler.record_function('mambair::fused_scan'):  # a C call is invisible to the profiler otherwise
        return _Call(lib, u, proj, wdt, bias, A, D, cadd, perm, height, width, softplus).forward()


def _check_parameters(where: str, dim: int, k_dirs: int, proj_width: int, wdt: Tensor, bias: Tensor | None,
                      A: Tensor, D: Tensor | None) -> None:
    """One line naming the first parameter whose shape does not fit (dim channels, K directions)."""
    rank, n = (wdt.shape[-1] if wdt.dim() else 0), (A.shape[-1] if A.dim() == 2 else 0)
    wants = [('dt_weight', wdt, (k_dirs, dim, rank)), ('A', A, (k_dirs * dim, n)),
             ('dt_bias', bias, (k_dirs, dim)), ('D', D, (k_dirs * dim,))]
    for name, t, shape in wants:
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f'{where}: {name} must be {shape}; got {tuple(t.shape)}')
    if rank < 1 or n < 1 or proj_width != rank + 2 * n:
        raise ValueError(f'{where}: the projection must hold dt_low, B and C (R + 2N = {rank} + 2 * {n} values per '
                         f'direction); got {proj_width}')


def scan_cross(u: Tensor, proj: Tensor, dt_weight: Tensor, dt_bias: Tensor | None, A: Tensor, D: Tensor | None,
               delta_softplus: bool = True) -> Tensor:
    """SS2D's four-direction selective scan of a channels-last feature map, summed over the directions.

    Args:
        u: (batch, H, W, dim) input (channels-last; any strides with contiguous channels).
        proj: (batch, H, W, 4 * (R + 2N)) or (batch, H, W, 4, R + 2N): the x projection of ``u`` for each
            direction, in grid order (``F.linear(u, x_proj_weight.view(-1, dim))``): dt_low, B, C.
        dt_weight: (4, dim, R); dt_bias: (4, dim) or None; A: (4 * dim, N); D: (4 * dim,) or None: SS2D's
            ``dt_projs_weight``, ``dt_projs_bias``, ``-exp(A_logs)``, ``Ds``.
        delta_softplus: softplus on delta + bias (SS2D: True).

    Returns:
        (batch, H, W, dim) float32: ``cross_merge`` of the four scans of ``cross_scan(u)`` (with D u each),
        computed in float32.
    """
    if u.dim() != 4:
        raise ValueError(f'scan_cross: u must be (batch, H, W, dim); got {tuple(u.shape)}')
    batch, height, width, dim = u.shape
    k_dirs = NUM_CROSS_DIRECTIONS
    width_proj = math.prod(proj.shape[3:])
    if proj.shape[:3] != u.shape[:3] or proj.dim() not in (4, 5) or width_proj % k_dirs:
        raise ValueError(f'scan_cross: proj must be (batch, H, W, 4 * (R + 2N)) for u {tuple(u.shape)}; got '
                         f'{tuple(proj.shape)}')
    _check_parameters('scan_cross', dim, k_dirs, width_proj // k_dirs, dt_weight, dt_bias, A, D)
    length = height * width
    y = _scan(u.reshape(batch, length, dim), proj.reshape(batch, length, k_dirs, width_proj // k_dirs), dt_weight,
              dt_bias, A, D, None, None, height, width, delta_softplus)
    return y.view(batch, height, width, dim)


def scan_permuted(u: Tensor, proj: Tensor, dt_weight: Tensor, dt_bias: Tensor | None, A: Tensor, D: Tensor | None,
                  perm: Tensor, c_add: Tensor | None = None, delta_softplus: bool = True) -> Tensor:
    """One selective scan over the positions in the order ``perm``, written back at the positions.

    Args:
        u: (batch, L, dim) input in position (e.g. raster) order.
        proj: (batch, L, R + 2N): the x projection of ``u`` in position order (dt_low, B, C).
        dt_weight: (1, dim, R) or (dim, R); dt_bias: (1, dim), (dim,) or None; A: (dim, N); D: (dim,) or None.
        perm: (batch, L) int64, a permutation per row: step t of batch row b is position ``perm[b, t]``.
        c_add: (batch, L, N) or None: added to C at *step* t (MambaIRv2's prompt, which is not permuted).
        delta_softplus: softplus on delta + bias.

    Returns:
        (batch, L, dim) float32 in position order: ``y_sorted`` of the scan over ``u[perm]`` (with D u),
        scattered back (``y[b, perm[b, t]] = y_sorted[b, t]``).
    """
    check_permuted_shapes(u, proj, dt_weight, dt_bias, A, D, perm, c_add)
    wdt = dt_weight.reshape(1, *dt_weight.shape[-2:])
    bias = None if dt_bias is None else dt_bias.reshape(1, -1)
    return _scan(u, proj[:, :, None], wdt, bias, A, D, c_add, perm, 1, u.shape[1], delta_softplus)


def check_permuted_shapes(u: Tensor, proj: Tensor, dt_weight: Tensor, dt_bias: Tensor | None, A: Tensor,
                          D: Tensor | None, perm: Tensor, c_add: Tensor | None) -> None:
    """The arguments of :func:`scan_permuted` fit together (one line naming the first that does not)."""
    if u.dim() != 3 or proj.dim() != 3 or proj.shape[:2] != u.shape[:2]:
        raise ValueError(f'scan_permuted: u must be (batch, L, dim) and proj (batch, L, R + 2N); got '
                         f'{tuple(u.shape)}, {tuple(proj.shape)}')
    batch, length, dim = u.shape
    if dt_weight.dim() not in (2, 3) or (dt_weight.dim() == 3 and dt_weight.shape[0] != 1):
        raise ValueError(f'scan_permuted: dt_weight must be (1, dim, R) or (dim, R); got {tuple(dt_weight.shape)}')
    _check_parameters('scan_permuted', dim, 1, proj.shape[-1], dt_weight.reshape(1, *dt_weight.shape[-2:]),
                      None if dt_bias is None else dt_bias.reshape(1, -1), A, D)
    check_permutation(perm, length)
    if perm.shape[0] != batch:
        raise ValueError(f'scan_permuted: perm must have {batch} rows (one per batch element); got {perm.shape[0]}')
    if c_add is not None and tuple(c_add.shape) != (batch, length, A.shape[1]):
        raise ValueError(f'scan_permuted: c_add must be {(batch, length, A.shape[1])}; got {tuple(c_add.shape)}')


def check_kernel(lib: ctypes.CDLL) -> None:
    """The fused entry points on small cases against the float64 :func:`~.orders.ordered_scan`, forward and
    backward: four directions over an odd, non-square grid of two tiles (column wrap inside a tile) with
    a partial channel block and the specialised N, and a permuted scan with the C addend and a generic N."""
    g = torch.Generator().manual_seed(1)
    for height, width, dim, n, rank, permuted in ((9, 13, 20, 16, 3, False), (1, 70, 12, 3, 2, True)):
        batch, k_dirs, length = 2, 1 if permuted else NUM_CROSS_DIRECTIONS, height * width
        u = torch.randn(batch, length, dim, generator=g)
        proj = torch.randn(batch, length, k_dirs, rank + 2 * n, generator=g)
        wdt, bias = torch.randn(k_dirs, dim, rank, generator=g), torch.randn(k_dirs, dim, generator=g)
        A, D = -torch.rand(k_dirs * dim, n, generator=g) * 4, torch.randn(k_dirs * dim, generator=g)
        perm = torch.stack([torch.randperm(length, generator=g) for _ in range(batch)]) if permuted else None
        cadd = torch.randn(batch, length, n, generator=g) if permuted else None
        dy = torch.randn(batch, length, dim, generator=g)
        call = _Call(lib, u, proj, wdt, bias, A, D, cadd, perm, height, width, True)
        y = call.forward(save_starts=True)
        du, dproj, dwdt, dbias, dA = call.backward(dy)
        leaves = [t.double().requires_grad_() for t in (u, proj, wdt, bias, A)]
        positions = perm[:, None] if permuted else cross_positions(height, width)
        y64 = ordered_scan(*leaves[:5], D.double(), positions, None if cadd is None else cadd.double())
        grads64 = torch.autograd.grad((y64 * dy.double()).sum(), leaves)
        du64 = grads64[0] - dy.double() * D.double().view(k_dirs, dim).sum(0)  # the kernel's du has no D term
        for name, got, want in (('fused y', y, y64.detach()), ('fused du', du.sum(1), du64),
                                *zip(('fused dproj', 'fused dwdt', 'fused dbias', 'fused dA'),
                                     (dproj, dwdt, dbias, dA), grads64[1:])):
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            if not err < 1e-5:
                raise KernelUnavailable(f'built kernel disagrees with the reference ({name}: relative error '
                                        f'{err:.1e})')
