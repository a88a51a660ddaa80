"""The ``triton`` scan: Triton kernels for CUDA tensors, forward and backward, on any GPU Triton supports.

Trains MambaIR on a GPU without building ``mamba_ssm``. Triton is imported lazily (the kernels live in
:mod:`.triton_kernels`; importing this package never imports Triton). The first use compiles the kernels
and checks them against the float64 reference on a small case; where Triton does not import, no CUDA GPU is
present or that check fails, :func:`unavailable_reason` says why and the dispatcher falls back to ``torch``.
With ``TRITON_INTERPRET=1`` set before the kernels are first loaded, the same kernel source runs on CPU
tensors through Triton's interpreter (the CPU tests do this).

Computes in float32 (states, decays and every sum), reads inputs of any float dtype through their strides;
float64 calls run the ``torch`` backend. The kernel design is described in :mod:`.triton_kernels`.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Tuple

import torch
from torch import Tensor

from ...errors import KernelUnavailable
from . import chunked, common
from .common import ScanOut, check_shapes, compute_dtype, finish, needs_graph
from .reference import selective_scan_reference

__all__ = ['load', 'reset', 'scan', 'unavailable_reason']

# Tile sizes. A program's tile is BLOCK_D x N x BLOCK_T float32 values per live tensor (N = 16 in MambaIR),
# spread over its warps' threads; the registers a thread needs set how many warps fit on a multiprocessor
# (65536 registers; at <= 128 per thread, 16 warps), and enough warps hide the latency of the scans'
# shuffles and of memory.
# - BLOCK_D channels share one load of the B and C tiles: B and C ((batch, G, N, L)) are read
#   H / BLOCK_D times from L2 instead of H times (H = channels per group, 120 in light SR).
# - BLOCK_T time steps are scanned in parallel per tile; larger tiles pay the per-tile carry (one reduction
#   over the tile) less often.
# - Training saves the state at every TRAIN_BLOCK_T tile start (N / TRAIN_BLOCK_T of the input size, 1/2 at
#   N = 16) and the backward recomputes a tile from it: both use the same tile length; the backward's live
#   set (states, adjoints, decays of both, gradients) is about twice the forward's.
# Registers per thread (ptxas for sm_90a, Triton 3.8, N 16, no spills): inference forward (4 x 16 x 64,
# 8 warps) 128, training forward (4 x 16 x 32, 4 warps) 127, fix-up (as inference) 100, backward
# (8 x 16 x 32, 8 warps) 244 (8 warps per SM; (4 x 16 x 32, 16 warps) needs 102). These are estimates
# from code size, not timings: benchmarks/bench_gpu.py --sweep times alternatives on a GPU.
INFER_BLOCK_T, INFER_BLOCK_D, INFER_WARPS = 64, 4, 8
TRAIN_BLOCK_T, TRAIN_BLOCK_D, TRAIN_WARPS = 32, 4, 4
BWD_BLOCK_D, BWD_WARPS = 8, 8
# dB and dC sum over a group's channel blocks: atomically (fast; the order of the additions varies between
# runs, as in mamba_ssm), or, when torch.use_deterministic_algorithms(True) is on or this is False, through
# per-block buffers summed afterwards (reproducible; (batch, dim / BWD_BLOCK_D, N, L) float32 each).
BWD_ATOMIC = True
# Time chunks: with fewer than PROGRAMS_PER_SM programs per multiprocessor (batch 1, long sequences) the
# forward also splits time into chunks scanned in parallel and stitched together (see triton_kernels).
# Each chunk keeps at least MIN_CHUNK_TILES tiles, so the stitching stays a small part of the work.
PROGRAMS_PER_SM = 4
MIN_CHUNK_TILES = 8
MAX_CHUNKS = 16
# Tests set this to force a number of chunks (None: chosen from the GPU's size).
FORCE_CHUNKS: int | None = None
CHAIN_BLOCK = 256  # (channel, state) pairs per program of the chunk chaining

_kernels: ModuleType | None = None
_error: KernelUnavailable | None = None
_checked = False


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when they were loaded)."""
    kernels = _load_kernels()
    return type(kernels.scan_fwd_kernel).__name__ == 'InterpretedFunction'


def _load_kernels() -> ModuleType:
    global _kernels
    if _kernels is None:
        try:
            from . import triton_kernels
        except Exception as exc:  # ImportError, or a Triton whose import fails on this machine
            raise KernelUnavailable(f'triton does not import ({exc!r})') from None
        _kernels = triton_kernels
    return _kernels


def load() -> ModuleType:
    """The kernel module, compiled and checked on the current CUDA device on the first call (the outcome is
    kept); raises :class:`KernelUnavailable` with the reason where the backend cannot run."""
    global _error, _checked
    if _error is None and not _checked:
        try:
            interpreting = os.environ.get('TRITON_INTERPRET') == '1' or (_kernels is not None and interpreted())
            if not interpreting and not torch.cuda.is_available():  # asked before the (slow) Triton import
                raise KernelUnavailable('no CUDA GPU (the triton backend scans CUDA tensors)')
            _load_kernels()
            if not interpreted():
                _self_check(torch.device('cuda', torch.cuda.current_device()))
            _checked = True
        except KernelUnavailable as exc:
            _error = exc
        except Exception as exc:  # a compiler or driver error of this GPU / Triton combination
            _error = KernelUnavailable(f'triton kernels fail on this GPU: {" ".join(str(exc).split())[:300]}')
    if _error is not None:
        raise _error
    return _kernels


def unavailable_reason() -> str | None:
    """Why the backend cannot be used (one line), or None when it can; compiles and checks on the first call."""
    return common.unavailable_reason(load)


def reset() -> None:
    """Forget the check's outcome (the next use checks again; a loaded kernel module stays)."""
    global _error, _checked
    _error, _checked = None, False


def _self_check(device: torch.device) -> None:
    """Outputs and gradients of a small case with every feature (time chunks, partial tiles, generic N,
    softplus, bias, D, last state) against the float64 reference: a miscompiling Triton is caught here."""
    global FORCE_CHUNKS
    g = torch.Generator().manual_seed(0)
    batch, dim, length, n = 2, 16, 150, 5
    t = {'u': torch.randn(batch, dim, length, generator=g), 'delta': torch.randn(batch, dim, length, generator=g),
         'A': -torch.rand(dim, n, generator=g) * 4, 'B': torch.randn(batch, 2, n, length, generator=g),
         'C': torch.randn(batch, 2, n, length, generator=g), 'D': torch.randn(dim, generator=g),
         'bias': torch.randn(dim, generator=g)}
    dy, dlast = torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, n, generator=g)
    args64 = {k: v.double().requires_grad_() for k, v in t.items()}
    y64, last64 = selective_scan_reference(*(args64[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D')),
                                           delta_bias=args64['bias'], delta_softplus=True, return_last_state=True)
    grads64 = torch.autograd.grad((y64 * dy.double()).sum() + (last64 * dlast.double()).sum(), list(args64.values()))
    saved, FORCE_CHUNKS = FORCE_CHUNKS, 2
    try:
        with torch.inference_mode(False), torch.enable_grad():  # the first scan may come from inference code
            leaves = {k: v.to(device).requires_grad_() for k, v in t.items()}
            y, last = _TritonScan.apply(*(leaves[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'bias')), True, True)
            grads = torch.autograd.grad((y * dy.to(device)).sum() + (last * dlast.to(device)).sum(),
                                        list(leaves.values()))
            y_inf, last_inf, _ = _forward(*(leaves[k].detach() for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'bias')),
                                          True, True, save_ckpt=False)
    finally:
        FORCE_CHUNKS = saved
    for name, got, want in (('y', y, y64), ('last state', last, last64), ('y (inference)', y_inf, y64),
                            ('last state (inference)', last_inf, last64), *zip(t, grads, grads64)):
        err = ((got.detach().cpu().double() - want.detach()).abs().max() / want.detach().abs().max()).item()
        if not err < 1e-4:
            raise KernelUnavailable(f'triton kernels disagree with the reference on this GPU ({name}: relative '
                                    f'error {err:.1e})')


# ------------------------------------------------------------------------------------------------
# launches
# ------------------------------------------------------------------------------------------------
def _block_d(channels_per_group: int, largest: int) -> int:
    """The largest power of two <= ``largest`` dividing the channels of a group (a block never spans two)."""
    block = 1
    while block * 2 <= largest and channels_per_group % (block * 2) == 0:
        block *= 2
    return block


def _chunks(programs: int, tiles: int, device: torch.device) -> int:
    """Time chunks of a forward: enough programs for PROGRAMS_PER_SM per multiprocessor (see above)."""
    if FORCE_CHUNKS is not None:
        return max(1, min(FORCE_CHUNKS, tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 1
    wanted = -(-PROGRAMS_PER_SM * sms // programs)
    return max(1, min(wanted, tiles // MIN_CHUNK_TILES, MAX_CHUNKS))


def _bc_strides(t: Tensor) -> Tuple[int, int, int, int]:
    """(batch, group, N, L) strides of B or C; a (batch, N, L) tensor is shared by every group (stride 0)."""
    return (t.stride(0), 0, t.stride(1), t.stride(2)) if t.dim() == 3 else tuple(t.stride())


def _strides3(t: Tensor) -> Tuple[int, int, int]:
    return tuple(t.stride())


class _Problem:
    """Shapes of one scan and the float32 parameter vectors the kernels read."""

    def __init__(self, u: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, bias: Tensor | None):
        self.batch, self.dim, self.length = u.shape
        self.n = A.shape[1]
        self.groups = max(t.shape[1] if t.dim() == 4 else 1 for t in (B, C))
        self.h = self.dim // self.groups
        self.block_n = max(1, 1 << (self.n - 1).bit_length())
        self.A = A.float().contiguous()
        self.D = None if D is None else D.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.device = u.device

    def constants(self, block_d: int, block_t: int, softplus: bool) -> dict:
        return dict(N=self.n, BLOCK_N=self.block_n, BLOCK_D=block_d, BLOCK_T=block_t, SOFTPLUS=bool(softplus),
                    HAS_BIAS=self.bias is not None)


def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, bias: Tensor | None,
             softplus: bool, need_last: bool, save_ckpt: bool) -> Tuple[Tensor, Tensor | None, Tensor | None]:
    """y + D u (batch, dim, L) float32, the last state (batch, dim, N) when ``need_last``, and with
    ``save_ckpt`` the state before every TRAIN_BLOCK_T tile (batch, dim, tiles, N)."""
    k = load()
    p = _Problem(u, A, B, C, D, bias)
    block_t, block_d, warps = ((TRAIN_BLOCK_T, TRAIN_BLOCK_D, TRAIN_WARPS) if save_ckpt
                               else (INFER_BLOCK_T, INFER_BLOCK_D, INFER_WARPS))
    block_d = _block_d(p.h, block_d)
    tiles = -(-p.length // block_t)
    blocks = p.dim // block_d
    chunks = _chunks(p.batch * blocks, tiles, p.device)
    chunk_tiles = -(-tiles // chunks)
    chunks = -(-tiles // chunk_tiles)
    chunk_len = chunk_tiles * block_t
    f32 = dict(device=p.device, dtype=torch.float32)
    y = torch.empty(p.batch, p.dim, p.length, **f32)
    ckpt = torch.empty(p.batch, p.dim, tiles, p.n, **f32) if save_ckpt else y
    save_end = chunks > 1 or need_last
    end = torch.empty(p.batch, chunks, p.dim, p.n, **f32) if save_end else y
    dtsum = torch.empty(p.batch, chunks, p.dim, **f32) if save_end else y
    consts = p.constants(block_d, block_t, softplus)
    k.scan_fwd_kernel[(blocks, p.batch, chunks)](
        u, delta, p.A, B, C, y if p.D is None else p.D, y if p.bias is None else p.bias,
        y, ckpt, end, dtsum,
        p.dim, p.length, p.h, chunk_len, chunks, tiles,
        *_strides3(u), *_strides3(delta), *_bc_strides(B), *_bc_strides(C),
        HAS_D=p.D is not None, SAVE_CKPT=save_ckpt, SAVE_END=save_end, num_warps=warps, **consts)
    if not save_end:
        return y, None, (ckpt if save_ckpt else None)
    starts = torch.empty(p.batch, chunks + 1, p.dim, p.n, **f32)  # chunk start states; [:, chunks]: the last
    k.scan_chain_kernel[(-(-p.dim * p.n // CHAIN_BLOCK), p.batch)](p.A, end, dtsum, starts, p.dim, chunks, N=p.n,
                                                                   BLOCK=CHAIN_BLOCK)
    if chunks > 1:
        k.scan_fix_kernel[(blocks, p.batch, chunks - 1)](
            delta, p.A, C, y if p.bias is None else p.bias, starts, y, ckpt,
            p.dim, p.length, p.h, chunk_len, chunks + 1, tiles,
            *_strides3(delta), *_bc_strides(C), SAVE_CKPT=save_ckpt, num_warps=warps, **consts)
    return y, (starts[:, chunks].contiguous() if need_last else None), (ckpt if save_ckpt else None)


def _backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, bias: Tensor | None,
              softplus: bool, ckpt: Tensor, dy: Tensor, dlast: Tensor | None) -> Tuple[Tensor | None, ...]:
    """Gradients w.r.t. (u, delta, A, B, C, D, bias) of y + D u (gradient ``dy``) and the last state."""
    k = load()
    p = _Problem(u, A, B, C, D, bias)
    block_d = _block_d(p.h, BWD_BLOCK_D)
    blocks = p.dim // block_d
    tiles = ckpt.shape[2]
    f32 = dict(device=p.device, dtype=torch.float32)
    du, ddelta = torch.empty(2, p.batch, p.dim, p.length, **f32).unbind(0)
    dA = torch.empty(p.batch, p.dim, p.n, **f32)
    dD, dbias = torch.empty(2, p.batch, p.dim, **f32).unbind(0)
    atomic = BWD_ATOMIC and not torch.are_deterministic_algorithms_enabled()

    def buffer(like: Tensor) -> Tensor:  # dB / dC: (batch, groups of `like`, N, L) sums, or per-block partials
        if atomic:
            return torch.zeros(p.batch, like.shape[1] if like.dim() == 4 else 1, p.n, p.length, **f32)
        return torch.empty(p.batch, blocks, p.n, p.length, **f32)

    def slot_strides(buf: Tensor, like: Tensor) -> Tuple[int, int]:  # (batch, group-or-block) strides
        return buf.stride(0), (0 if atomic and like.dim() == 3 else buf.stride(1))

    dB, dC = buffer(B), buffer(C)
    dlast = None if dlast is None else dlast.float().contiguous()
    k.scan_bwd_kernel[(blocks, p.batch)](
        u, delta, p.A, B, C, du if p.D is None else p.D, du if p.bias is None else p.bias, dy,
        du if dlast is None else dlast, ckpt, du, ddelta, dA, dD, dbias, dB, dC,
        p.dim, p.length, p.h, tiles,
        *_strides3(u), *_strides3(delta), *_bc_strides(B), *_bc_strides(C), *_strides3(dy),
        *slot_strides(dB, B), *slot_strides(dC, C),
        HAS_D=p.D is not None, HAS_DLAST=dlast is not None, ATOMIC=atomic, num_warps=BWD_WARPS,
        **p.constants(block_d, TRAIN_BLOCK_T, softplus))

    def per_group(buf: Tensor, like: Tensor) -> Tensor:  # shaped like B / C
        if atomic:
            return buf.view(like.shape)
        if like.dim() == 3:
            return buf.sum(1)
        return buf.view(p.batch, like.shape[1], -1, p.n, p.length).sum(2)

    return (du, ddelta, dA.sum(0), per_group(dB, B), per_group(dC, C), None if D is None else dD.sum(0),
            None if bias is None else dbias.sum(0))


class _TritonScan(torch.autograd.Function):
    """y + D u and the last state; the backward recomputes each tile's states from the saved tile starts."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                bias: Tensor | None, softplus: bool, need_last: bool) -> Tuple[Tensor, Tensor | None]:
        y, last, ckpt = _forward(u, delta, A, B, C, D, bias, softplus, need_last, save_ckpt=True)
        ctx.save_for_backward(u, delta, A, B, C, D, bias, ckpt)
        ctx.softplus = softplus
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, dy: Tensor | None, dlast: Tensor | None):
        u, delta, A, B, C, D, bias, ckpt = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u, dtype=torch.float32)
        return (*_backward(u, delta, A, B, C, D, bias, ctx.softplus, ckpt, dy, dlast), None, None)


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
         return_last_state: bool = False) -> ScanOut:
    """The ``triton`` backend (shapes as :func:`~basicsr_mambair.ops.scan.selective_scan`): CUDA tensors (CPU
    tensors in Triton's interpreter), computing in float32; float64 calls run the ``torch`` backend."""
    check_shapes(u, delta, A, B, C)
    if compute_dtype(u.dtype) == torch.float64:
        return chunked.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out_dtype = u.dtype
    if needs_graph(u, delta, A, B, C, D, delta_bias):
        y, last = _TritonScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, return_last_state)
        out = finish(y, u, None, z, out_dtype)
    else:  # inference: nothing saved, the gate applied in place
        y, last, _ = _forward(u, delta, A, B, C, D, delta_bias, delta_softplus, return_last_state, save_ckpt=False)
        out = finish(y, u, None, z, out_dtype, inplace=not needs_graph(z))
    return (out, last) if return_last_state else out
