"""The ``compiled`` selective scan: a C kernel for CPU tensors (forward and backward), built on first use.

``scan_kernel.c`` (the flat scan) and ``scan_fused.c`` (scans walking several orders of position-major
inputs, :mod:`.fused`), with their shared ``scan_common.h``, are compiled with the system's C compiler
(``$CC``, else cc / gcc / clang) into one shared library cached under ``$MAMBAIR_CACHE_DIR`` (default
``~/.cache/basicsr_mambair``), keyed by the sources, the compiler and the CPU, and called through ctypes
on float32 tensors in place. Work is split over ``torch.get_num_threads()`` threads (ctypes releases the
GIL). Where no compiler is found, the build fails or the library disagrees with the float64 reference on
a small case, :func:`load` raises :class:`KernelUnavailable` with the reason and the caller uses the
``torch`` backend.

:func:`scan` is the backend's entry point: :func:`scan_forward` serves inference, :func:`scan_autograd`
training (its backward recomputes the states tile by tile, so nothing of size (batch, dim, L, N) is kept).
It computes in float32 (float32 / float16 / bfloat16 inputs) and runs the ``torch`` backend for float64.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Tuple

import torch
from torch import Tensor

from ...errors import KernelUnavailable
from . import chunked, common
from .common import ScanOut, check_shapes, compute_dtype, finish, needs_graph
from .reference import selective_scan_reference

__all__ = ['KernelUnavailable', 'cache_dir', 'load', 'reset', 'scan', 'scan_autograd', 'scan_forward',
           'unavailable_reason']

SOURCES = tuple(Path(__file__).with_name(name) for name in ('scan_kernel.c', 'scan_fused.c'))
HEADERS = (Path(__file__).with_name('scan_common.h'),)
LOG2E = math.log2(math.e)
LANES = 16  # channels per vector (W of scan_common.h): the unit of work
# (batch, dim, L, N) elements per thread at least: below, the pool's hand-off (~0.1 ms) costs more than
# it saves.
MIN_PARALLEL_ELEMS = 1 << 18


class _Args(ctypes.Structure):
    """``scan_args`` of scan_kernel.c (same field order)."""
    _fields_ = ([(k, ctypes.c_void_p) for k in ('u', 'delta', 'A2', 'B', 'C', 'D', 'bias', 'y', 'last')] +
                [(k, ctypes.c_int64) for k in ('batch', 'dim', 'groups', 'n', 'length', 'b_batch', 'b_group',
                                               'c_batch', 'c_group', 'softplus')] +
                [(k, ctypes.c_void_p) for k in ('A', 'dy', 'dlast', 'du', 'ddelta', 'dA', 'dB', 'dC')])


class FusedArgs(ctypes.Structure):
    """``fused_args`` of scan_fused.c (same field order; used by :mod:`.fused`)."""
    _fields_ = ([(k, ctypes.c_void_p) for k in ('u', 'proj', 'cadd', 'wdt', 'bias', 'A2', 'A', 'D', 'perm', 'y')] +
                [(k, ctypes.c_int64) for k in ('batch', 'dim', 'n', 'r', 'dirs', 'length', 'height', 'width', 'order',
                                               'softplus', 'u_batch', 'u_pos', 'x_batch', 'x_pos', 'x_dir',
                                               'c_batch', 'c_step', 'unit_blocks')] +
                [(k, ctypes.c_void_p) for k in ('starts', 'dy', 'du', 'dproj', 'dwdt', 'dbias', 'dA')])


_lib: ctypes.CDLL | None = None
_error: KernelUnavailable | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def cache_dir() -> Path:
    """Where built kernels are kept: ``$MAMBAIR_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or ~/.cache."""
    if os.environ.get('MAMBAIR_CACHE_DIR'):
        return Path(os.environ['MAMBAIR_CACHE_DIR'])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'basicsr_mambair'


def _compiler() -> str:
    cc = os.environ.get('CC')
    if cc:  # the user's choice: a wrong one is reported, not silently replaced
        found = shutil.which(cc)
        if not found:
            raise KernelUnavailable(f'$CC is {cc!r}, which is not an executable (unset CC or point it at a C '
                                    'compiler)')
        return found
    for name in ('cc', 'gcc', 'clang'):
        if shutil.which(name):
            return shutil.which(name)
    raise KernelUnavailable('no C compiler found (set CC, or install gcc or clang)')


def _cpu_signature() -> str | None:
    """The CPU's model and feature flags on Linux (None elsewhere: then no -march=native, see _build)."""
    try:
        lines = Path('/proc/cpuinfo').read_text().splitlines()
    except OSError:
        return None
    wanted = ('model name', 'flags', 'Features', 'CPU part', 'isa')
    return '\n'.join(sorted({ln for ln in lines if ln.split(':')[0].strip() in wanted}))


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, '--version'], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f'C compiler {cc} does not run: {exc}') from exc


def _attempts(cc: str, version: str) -> list[tuple[list[str], str]]:
    """(compiler flags, library file name) to try in order; the name is keyed by source, compiler and CPU."""
    cpu = _cpu_signature()
    # -march=native only where the cache key names the CPU, so a shared home directory never hands a
    # library built for one CPU to another. No -ffast-math: inf and NaN must behave as in PyTorch.
    source = b'\0'.join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    found = []
    for extra in ([['-march=native']] if cpu else []) + [[]]:
        flags = ['-O3', '-std=gnu11', '-fPIC', '-shared', *extra]
        key = hashlib.sha256(b'\0'.join([source, cc.encode(), version.encode(), ' '.join(flags).encode(),
                                         (cpu or platform.machine()).encode()])).hexdigest()[:20]
        found.append((flags, f'scan_kernel-{key}{".dll" if sys.platform == "win32" else ".so"}'))
    return found


def _owner_problem(st: os.stat_result) -> str | None:
    """Why a cache entry with this ``stat`` must not be trusted (another owner, writable by others), or None."""
    if not hasattr(os, 'geteuid'):
        return None  # no POSIX owners (Windows): the folder's ACLs decide
    if st.st_uid != os.geteuid():
        return f'is owned by user id {st.st_uid}, not by you ({os.geteuid()})'
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return 'is writable by other users'
    return None


def _cache_folder() -> Path:
    """The first safe, writable kernel folder: ``cache_dir()``, else ``$TMPDIR/basicsr_mambair-<uid>``.

    Created with mode 0700; an existing folder is used only if it is ours and not group/world-writable (any
    user could otherwise plant a library that we would load).
    """
    user = os.geteuid() if hasattr(os, 'geteuid') else 0
    problems = []
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f'basicsr_mambair-{user}'):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder = folder.resolve()  # checks and later use name the same folder
            problem = _owner_problem(folder.stat())
            if problem:
                problems.append(f'{folder} {problem}')
                continue
            tempfile.NamedTemporaryFile(dir=folder).close()  # writable?
            return folder
        except OSError as exc:
            problems.append(f'{folder}: {exc.strerror or exc}')
    raise KernelUnavailable(f'no safe, writable folder for the built kernel (set MAMBAIR_CACHE_DIR to a folder of '
                            f'yours): {problems[-1]}')


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(target: Path) -> Path:
    """The file holding the SHA-256 of ``target`` as we built it (hidden, beside it)."""
    return target.with_name(f'.{target.name}.sha256')


def _is_our_build(target: Path) -> bool:
    """``target`` is a regular file of ours, not writable by others, whose content hash is the one we recorded
    when we built it."""
    record = _record(target)
    try:
        for path in (target, record):
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or _owner_problem(st):
                return False
        return record.read_text().strip() == _digest(target)
    except OSError:
        return False


def _build() -> Path:
    """Compile the kernel sources once per (sources, compiler, CPU); return the shared library's path.

    The cache is trusted only if it is ours: the folder (:func:`_cache_folder`, mode 0700) must be owned by
    the current user and not writable by others, and a cached library is loaded only if it is ours too and
    its SHA-256 matches the one recorded when we built it (:func:`_is_our_build`); else it is rebuilt over.
    """
    cc = _compiler()
    version = _compiler_version(cc)
    folder = _cache_folder()
    errors = []
    for flags, name in _attempts(cc, version):
        target = folder / name
        if _is_our_build(target):
            return target
        tmp = target.with_name(f'{target.name}.{os.getpid()}.tmp')  # concurrent builds (DDP) never clash
        try:
            proc = subprocess.run([cc, *flags, *map(str, SOURCES), '-o', str(tmp)], capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        if proc.returncode == 0 and tmp.exists():
            record = _record(target)
            record_tmp = record.with_name(f'{record.name}.{os.getpid()}.tmp')
            record_tmp.write_text(_digest(tmp) + '\n')
            os.replace(tmp, target)
            os.replace(record_tmp, record)
            return target
        tmp.unlink(missing_ok=True)
        lines = proc.stderr.strip().splitlines() or [f'exit status {proc.returncode}']
        errors.append(next((ln for ln in lines if 'error' in ln.lower()), lines[0]))
    raise KernelUnavailable(f'{cc} could not build {", ".join(path.name for path in SOURCES)}: {errors[-1]}')


def _self_check(lib: ctypes.CDLL) -> None:
    """The flat kernel on small cases with every feature (partial channel blocks, a partial tile, generic N,
    softplus, bias, D, last state, shared and grouped B/C), forward and backward, against the float64
    reference: a compiler that miscompiles it is caught here, not in a user's results. The fused entry points
    have their own check (:func:`.fused.load`)."""
    with torch.inference_mode(False), torch.enable_grad():  # the first scan may come from inference code
        _compare_with_reference(lib)


def _compare_with_reference(lib: ctypes.CDLL) -> None:
    g = torch.Generator().manual_seed(0)
    batch, dim, length = 2, 40, 70
    for n, b_groups in ((16, 2), (3, 0)):
        u, delta = torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, length, generator=g)
        A = -torch.rand(dim, n, generator=g) * 4
        B = torch.randn(batch, *((b_groups,) if b_groups else ()), n, length, generator=g)
        C = torch.randn(batch, 2, n, length, generator=g)
        D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
        dy = torch.randn(batch, dim, length, generator=g)
        y, last = _Call(lib, u, delta, A, B, C, D, bias, True).forward(True)
        grads = _Call(lib, u, delta, A, B, C, None, bias, True).backward(dy, last)
        grads = (*grads[:3], *(d.sum(1) if t.dim() == 3 else d for d, t in ((grads[3], B), (grads[4], C))))
        leaves = [t.double().requires_grad_() for t in (u, delta, A, B, C)]
        y64, last64 = selective_scan_reference(*leaves, None, None, bias.double(), True, True)
        grads64 = torch.autograd.grad((y64 * dy.double()).sum() + (last64 * last.double()).sum(), leaves)
        y64 = y64.detach() + D.double()[:, None] * u.double()
        for name, got, want in (('y', y, y64), ('last state', last, last64), *zip('u delta A B C'.split(), grads,
                                                                                  grads64)):
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            if not err < 1e-5:
                raise KernelUnavailable(f'built kernel disagrees with the reference ({name}: relative error '
                                        f'{err:.1e})')


def load() -> ctypes.CDLL:
    """The built and checked kernel library (built on the first call; the outcome is kept)."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            lib = ctypes.CDLL(str(_build()))
            counter = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]  # work-unit counter, unit count
            lib.mambair_scan_forward.argtypes = [ctypes.POINTER(_Args), *counter]
            lib.mambair_scan_forward.restype = None
            lib.mambair_scan_units.argtypes = [ctypes.POINTER(_Args)]
            lib.mambair_scan_units.restype = ctypes.c_int64
            lib.mambair_scan_backward.argtypes = [ctypes.POINTER(_Args), *counter]
            lib.mambair_scan_backward.restype = ctypes.c_int
            lib.mambair_step_major.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 5, *counter]
            lib.mambair_step_major.restype = None
            fused_args = ctypes.POINTER(FusedArgs)
            lib.mambair_fused_forward.argtypes = [fused_args, *counter]
            lib.mambair_fused_forward.restype = ctypes.c_int
            lib.mambair_fused_backward.argtypes = [fused_args, *counter]
            lib.mambair_fused_backward.restype = ctypes.c_int
            lib.mambair_fused_starts_size.argtypes = [fused_args]
            lib.mambair_fused_starts_size.restype = ctypes.c_int64
            _self_check(lib)
            _lib = lib
        except KernelUnavailable as exc:
            _error = exc
        except (OSError, AttributeError) as exc:  # a library that does not load or lacks the symbols
            _error = KernelUnavailable(f'built kernel does not load: {exc}')
    if _error is not None:
        raise _error
    return _lib


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used here (one line), or None when it can; builds it on the first call."""
    return common.unavailable_reason(load)


def reset() -> None:
    """Forget the loaded library and any failure (for tests)."""
    global _lib, _error
    _lib = _error = None


def ptr(t: Tensor | None) -> int | None:
    """A tensor's data pointer for a ctypes struct field (NULL for None)."""
    return None if t is None else t.data_ptr()


def workers(elems: int) -> int:
    """Threads for a scan over ``elems`` (batch, dim, L, N) values: torch's intra-op thread count, at most
    one per MIN_PARALLEL_ELEMS."""
    return min(torch.get_num_threads(), max(1, elems // MIN_PARALLEL_ELEMS))


def parallel(fn: Callable, count: int, *args: object, elems: int) -> list:
    """fn(*args, counter, count) on :func:`workers` threads (at most ``count``), each taking work units from
    the shared counter. Returns each call's result."""
    global _pool, _pool_size
    counter = ctypes.c_int64(0)
    call = functools.partial(fn, *args, ctypes.byref(counter), count)
    workers_now = min(workers(elems), count)
    if workers_now <= 1:
        return [call()]
    if _pool is None or _pool_size != workers_now - 1:
        _pool, _pool_size = ThreadPoolExecutor(workers_now - 1, thread_name_prefix='mambair-scan'), workers_now - 1
    jobs = [_pool.submit(call) for _ in range(workers_now - 1)]
    return [call()] + [job.result() for job in jobs]  # the calling thread works too


class _Call:
    """The inputs in the kernel's layout (float32, contiguous, B and C step-major) and the argument struct
    pointing at them; the tensors live as long as this object."""

    def __init__(self, lib: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Tensor | None, bias: Tensor | None, softplus: bool):
        self.lib, self.shape = lib, u.shape
        batch, dim, length = u.shape
        self.n = A.shape[1]
        self.elems = batch * dim * length * self.n
        self.groups = max(t.shape[1] if t.dim() == 4 else 1 for t in (B, C))
        self.u, self.delta = u.float().contiguous(), delta.float().contiguous()
        self.A = A.float().contiguous()
        self.A2 = self.A * LOG2E
        (self.B, b_batch, b_group), (self.C, c_batch, c_group) = self._step_major(B), self._step_major(C)
        self.D = None if D is None else D.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.args = _Args(ptr(self.u), ptr(self.delta), ptr(self.A2), ptr(self.B), ptr(self.C), ptr(self.D),
                          ptr(self.bias), None, None, batch, dim, self.groups, self.n, length, b_batch, b_group,
                          c_batch, c_group, int(softplus), ptr(self.A))

    def _step_major(self, t: Tensor) -> Tuple[Tensor, int, int]:
        """B or C, (batch, N, L) or (batch, G, N, L), as float32 (..., L, N); its batch and group strides.

        Read in place through its strides where its rows (batch x group) are evenly spaced, as MambaIR's
        slices of one projection are; anything else is made contiguous first."""
        src = t if t.dtype == torch.float32 else t.float()
        rows_even = src.dim() == 3 or src.shape[0] == 1 or src.stride(0) == src.shape[1] * src.stride(1)
        if not rows_even:
            src = src.contiguous()
        n, length = src.shape[-2:]
        dst = torch.empty(*src.shape[:-2], length, n)
        rows = src.numel() // (n * length)
        row_stride = src.stride(0) if src.dim() == 3 else src.stride(1)
        parallel(self.lib.mambair_step_major, rows, src.data_ptr(), dst.data_ptr(), n, length, row_stride,
                  src.stride(-2), src.stride(-1), elems=self.elems)
        return (dst, length * n, 0) if t.dim() == 3 else (dst, dst.shape[1] * length * n, length * n)

    def set(self, **tensors: Tensor | None) -> None:
        """Point the struct's output / gradient fields at ``tensors`` (kept alive here)."""
        for name, t in tensors.items():
            setattr(self, f'_{name}', t)
            setattr(self.args, name, ptr(t))

    def forward(self, last_state: bool) -> Tuple[Tensor, Tensor | None]:
        batch, dim, _ = self.shape
        y = torch.empty_like(self.u)
        last = self.u.new_empty(batch, dim, self.n) if last_state else None
        self.set(y=y, last=last)
        units = self.lib.mambair_scan_units(ctypes.byref(self.args))
        parallel(self.lib.mambair_scan_forward, units, ctypes.byref(self.args), elems=self.elems)
        return y, last

    def backward(self, dy: Tensor, dlast: Tensor | None) -> Tuple[Tensor, ...]:
        """du, ddelta (w.r.t. delta before bias and softplus), dA (dim, N), and dB, dC as
        (batch, G, N, L) for all G groups of channels (the caller sums over G where B or C is shared)."""
        batch, dim, length = self.shape
        grads = {'du': torch.empty_like(self.u), 'ddelta': torch.empty_like(self.u),
                 'dA': self.u.new_empty(batch, dim, self.n),
                 'dB': self.u.new_empty(batch, self.groups, length, self.n),
                 'dC': self.u.new_empty(batch, self.groups, length, self.n)}
        self.set(dy=dy.float().contiguous(), dlast=None if dlast is None else dlast.float().contiguous(), **grads)
        status = parallel(self.lib.mambair_scan_backward, batch * self.groups, ctypes.byref(self.args),
                           elems=self.elems)
        if any(status):
            raise MemoryError('selective scan backward: no memory for its per-thread buffers')
        return (grads['du'], grads['ddelta'], grads['dA'].sum(0), grads['dB'].transpose(-1, -2),
                grads['dC'].transpose(-1, -2))


def _run(lib: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
         delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool) -> Tuple[Tensor, Tensor | None]:
    return _Call(lib, u, delta, A, B, C, D, delta_bias, delta_softplus).forward(return_last_state)


class _CompiledScan(torch.autograd.Function):
    """y (without D and gate) and the last state, with the kernel's backward (states recomputed)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, bias: Tensor | None,
                softplus: bool) -> Tuple[Tensor, Tensor]:
        ctx.save_for_backward(u, delta, A, B, C, bias)
        ctx.softplus = softplus
        return _run(load(), u, delta, A, B, C, None, bias, softplus, True)

    @staticmethod
    def backward(ctx, dy: Tensor | None, dlast: Tensor | None):
        u, delta, A, B, C, bias = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        du, ddelta, dA, dB, dC = _Call(load(), u, delta, A, B, C, None, bias, ctx.softplus).backward(dy, dlast)
        dB, dC = (dB.sum(1) if B.dim() == 3 else dB), (dC.sum(1) if C.dim() == 3 else dC)
        dbias = None if bias is None else ddelta.sum((0, 2))
        return du, ddelta, dA, dB, dC, dbias, None


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                 delta_bias: Tensor | None = None, delta_softplus: bool = False,
                 return_last_state: bool = False) -> Tuple[Tensor, Tensor | None]:
    """Forward scan without gate (shapes as :func:`~basicsr_mambair.ops.scan.selective_scan`, validated there).

    Returns y (batch, dim, L) float32 including ``D * u``, and the last state (batch, dim, N) float32 or
    None. Raises :class:`KernelUnavailable` when the kernel cannot be built here.
    """
    return _run(load(), u, delta, A, B, C, D, delta_bias, delta_softplus, return_last_state)


def scan_autograd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None = None,
                  delta_softplus: bool = False) -> Tuple[Tensor, Tensor]:
    """Differentiable scan without D and gate, for float32 tensors: y (batch, dim, L) and the last state
    (batch, dim, N). Raises :class:`KernelUnavailable` when the kernel cannot be built here."""
    load()
    return _CompiledScan.apply(u, delta, A, B, C, delta_bias, delta_softplus)


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
         return_last_state: bool = False) -> ScanOut:
    """The ``compiled`` backend (shapes as :func:`~basicsr_mambair.ops.scan.selective_scan`): the C kernel,
    computing in float32; float64 calls run the ``torch`` backend."""
    check_shapes(u, delta, A, B, C)
    if compute_dtype(u.dtype) == torch.float64:
        return chunked.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out_dtype, f32 = u.dtype, torch.float32
    if needs_graph(u, delta, A, B, C, delta_bias):
        u = u.to(f32)
        y, last = scan_autograd(u, delta.to(f32), A.to(f32), B.to(f32), C.to(f32),
                                None if delta_bias is None else delta_bias.to(f32), delta_softplus)
        out = finish(y, u, D, z, out_dtype)
    elif needs_graph(D, z):  # D and the gate with autograd, the scan without
        y, last = scan_forward(u, delta, A, B, C, None, delta_bias, delta_softplus, return_last_state)
        out = finish(y, u, D, z, out_dtype)
    else:  # inference: D inside the kernel, the gate in place
        y, last = scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, return_last_state)
        out = finish(y, u, None, z, out_dtype, inplace=True)
    return (out, last) if return_last_state else out
