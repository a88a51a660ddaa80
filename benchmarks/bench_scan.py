"""Benchmark of the selective scan on CPU (a benchmark, not a test; needs the ``bench`` extra: mambapy).

Compares, in one run and at the shapes MambaIR scans, our two CPU backends, ``compiled`` (the C kernel
that ``auto`` runs on a CPU) and the chunked pure-PyTorch ``torch``, with
- ``reference``: our sequential backend (a lean loop over time on (batch, dim, N) states),
- ``seq_full``: the sequential loop structured like ``mamba_ssm``'s ``selective_scan_ref`` (decays and
  inputs precomputed as (batch, dim, L, N) tensors, one einsum per step; forward only),
- ``mambapy``: mamba.py's selective scan over its parallel scan (``mambapy.pscan``),
reporting the error against a float64 sequential evaluation, the median time of repeated runs after
warm-up (forward under ``no_grad``, and forward+backward) and the peak extra memory (resident set growth
of a fresh process running it once). It also times the machine's elementwise floor for the same
element count: a multiply (dt * A), an exp and a multiply-add over a (batch, dim, L, N) float32 tensor
in preallocated buffers, and prints our time as a multiple of it. Ratios are only taken within one run.
"Ours" is what ``auto`` runs on a CPU: ``compiled``.

Usage::

    python benchmarks/bench_scan.py                       # shapes a-d, 1 and 2 threads
    python benchmarks/bench_scan.py --shapes a --threads 1 2
    python benchmarks/bench_scan.py --json scan.json --markdown scan.md
    python benchmarks/bench_scan.py --shapes a --quick    # times only (no error check, no memory runs)

On a shared machine note the load average (printed at start and end): with 2 threads every OpenMP
region waits whenever another process holds a core, which inflates multithreaded times several-fold.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from machine import machine  # noqa: E402

from basicsr_mambair.ops import selective_scan, selective_scan_reference  # noqa: E402

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Shape:
    key: str
    name: str
    batch: int
    dim: int
    groups: int
    n: int
    length: int
    modes: tuple

    @property
    def state_elems(self) -> int:
        """Elements of one (batch, dim, L, N) tensor."""
        return self.batch * self.dim * self.length * self.n

    def label(self) -> str:
        return f'({self.key}) {self.name}: b={self.batch} dim={self.dim} N={self.n} L={self.length}'


SHAPES = {
    'a': Shape('a', 'light SR patch', 1, 480, 4, 16, 4096, ('fwd', 'fwd+bwd')),
    'b': Shape('b', 'classic SR patch', 1, 1440, 4, 16, 4096, ('fwd', 'fwd+bwd')),
    'c': Shape('c', 'training', 4, 480, 4, 16, 4096, ('fwd+bwd',)),
    'd': Shape('d', 'large image', 1, 480, 4, 16, 65536, ('fwd',)),
}
IMPLS = ('compiled', 'torch', 'reference', 'seq_full', 'mambapy')
IMPL_MODES = {'seq_full': ('fwd',)}  # its backward (autograd through 4096 einsums) takes minutes
OURS = 'compiled'  # what backend='auto' runs on a CPU
# rough peak memory of one run in (batch, dim, L, N) float32 tensors, to skip what cannot fit
STATE_COPIES = {('mambapy', 'fwd'): 6, ('mambapy', 'fwd+bwd'): 12, ('reference', 'fwd'): 0.5,
                ('reference', 'fwd+bwd'): 8, ('seq_full', 'fwd'): 6, ('seq_full', 'fwd+bwd'): 12,
                ('torch', 'fwd'): 0.5, ('torch', 'fwd+bwd'): 1, ('compiled', 'fwd'): 0.5,
                ('compiled', 'fwd+bwd'): 1}


# ------------------------------------------------------------------------------------------------
# inputs and implementations
# ------------------------------------------------------------------------------------------------
def make_inputs(s: Shape, dtype: torch.dtype = torch.float32, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs as MambaIR's SS2D builds them (S4D-real A, dt bias in [1e-3, 0.1], D = 1)."""
    g = torch.Generator().manual_seed(seed)
    b, d, n, L, G = s.batch, s.dim, s.n, s.length, s.groups
    dt0 = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        'u': torch.randn(b, d, L, generator=g).to(dtype),
        'delta': (0.5 * torch.randn(b, d, L, generator=g)).to(dtype),
        'A': -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(dtype),
        'B': torch.randn(b, G, n, L, generator=g).to(dtype),
        'C': torch.randn(b, G, n, L, generator=g).to(dtype),
        'D': torch.ones(d, dtype=dtype),
        'delta_bias': (dt0 + torch.log(-torch.expm1(-dt0))).to(dtype),
    }


def run_torch(u, delta, A, B, C, D, delta_bias):
    return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True, backend='torch')


def run_compiled(u, delta, A, B, C, D, delta_bias):
    return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True, backend='compiled')


def run_reference(u, delta, A, B, C, D, delta_bias):
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)


def run_mambapy(u, delta, A, B, C, D, delta_bias):
    """mamba.py's ``selective_scan`` (pscan over (b, L, dim, N) tensors), with B/C groups expanded."""
    from mambapy.pscan import pscan

    b, d, L = u.shape
    G, n = B.shape[1], B.shape[2]
    x = u.transpose(1, 2)  # (b, L, d)
    dt = torch.nn.functional.softplus(delta + delta_bias[:, None]).transpose(1, 2)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, d, N)
    Bx = B.permute(0, 3, 1, 2).unsqueeze(3).expand(b, L, G, d // G, n).reshape(b, L, d, n)
    BX = dt.unsqueeze(-1) * Bx * x.unsqueeze(-1)
    hs = pscan(deltaA, BX)  # (b, L, d, N)
    Cx = C.permute(0, 3, 1, 2).unsqueeze(-1)  # (b, L, G, N, 1)
    y = (hs.view(b, L, G, d // G, n) @ Cx).view(b, L, d)
    return (y + D * x).transpose(1, 2)


def run_seq_full(u, delta, A, B, C, D, delta_bias):
    """Sequential loop over precomputed (b, dim, L, N) decays and inputs, one einsum per step (the structure
    of mamba_ssm's ``selective_scan_ref``, the usual reference implementation)."""
    dt = torch.nn.functional.softplus(delta + delta_bias[:, None])
    b, d, L = u.shape
    Bf = B.repeat_interleave(d // B.shape[1], dim=1)  # (b, d, N, L)
    Cf = C.repeat_interleave(d // C.shape[1], dim=1)
    decay = torch.exp(torch.einsum('bdl,dn->bdln', dt, A))
    inp = torch.einsum('bdl,bdnl,bdl->bdln', dt, Bf, u)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append(torch.einsum('bdn,bdn->bd', h, Cf[:, :, :, t]))
    return torch.stack(ys, dim=2) + u * D[:, None]


RUNNERS: Dict[str, Callable] = {'compiled': run_compiled, 'torch': run_torch, 'reference': run_reference,
                                'seq_full': run_seq_full, 'mambapy': run_mambapy}
GRAD_KEYS = ('u', 'delta', 'A', 'B', 'C')


def run_once(impl: str, mode: str, inputs: Dict[str, torch.Tensor], cotangent: torch.Tensor):
    """One forward (no_grad) or forward+backward; returns y (and the input gradients)."""
    fn = RUNNERS[impl]
    if mode == 'fwd':
        with torch.no_grad():
            return fn(**inputs), None
    leaves = {k: (v.detach().requires_grad_(k in GRAD_KEYS)) for k, v in inputs.items()}
    y = fn(**leaves)
    grads = torch.autograd.grad(y, [leaves[k] for k in GRAD_KEYS], cotangent)
    return y.detach(), grads


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def time_runs(fn: Callable[[], object], repeats: int, warmup: int, budget_s: float) -> tuple:
    """Median seconds of ``repeats`` runs after ``warmup`` runs; fewer runs when one exceeds the budget."""
    samples = []
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    if first * (repeats + 1) > budget_s:  # too slow: count the warm-up run, repeat only within the budget
        samples.append(first)
        repeats = max(0, min(repeats, int(budget_s / first)) - 1)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), len(samples)


def elementwise_floor(s: Shape, repeats: int) -> float:
    """Seconds for multiply (dt * A), exp and multiply-add passes over (batch, dim, L, N) float32 values.

    Preallocated buffers (no page faults); blocks of at most 2^25 elements (128 MB, beyond the caches).
    """
    steps = max(1, min(s.length, (1 << 25) // (s.batch * s.dim * s.n)))
    dt = torch.rand(s.batch, s.dim, steps, 1)
    A = -torch.rand(s.dim, 1, s.n)
    a = torch.empty(s.batch, s.dim, steps, s.n)
    h = torch.randn(s.batch, s.dim, steps, s.n)
    blocks, rest = divmod(s.length, steps)

    def run():
        for i in range(blocks + (rest > 0)):
            m = steps if i < blocks else rest
            torch.mul(dt[:, :, :m], A, out=a[:, :, :m])
            a[:, :, :m].exp_()
            h[:, :, :m].addcmul_(a[:, :, :m], h[:, :, :m])
    return time_runs(run, repeats, 1, 60)[0]


def _rss_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def cotangent(s: Shape) -> torch.Tensor:
    """Fixed output gradient for the forward+backward runs."""
    return torch.randn(s.batch, s.dim, s.length, generator=torch.Generator().manual_seed(1))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def reference64(s: Shape, mem_limit: float, path: Path) -> None:
    """Float64 sequential evaluation (output; input gradients where the memory allows) saved to ``path``."""
    inputs64 = {k: v.double() for k, v in make_inputs(s).items()}
    with torch.no_grad():
        ref = {'fwd': run_reference(**inputs64)}
    if 'fwd+bwd' in s.modes and 2 * STATE_COPIES['reference', 'fwd+bwd'] * s.state_elems * 4 <= mem_limit:
        ref['grads'] = run_once('reference', 'fwd+bwd', inputs64, cotangent(s).double())[1]
    torch.save(ref, path)


def child(shape_key: str, impl: str, mode: str, ref_path: str) -> None:
    """In a fresh process: peak resident growth (MB) of one run and its error, printed as JSON."""
    torch.set_num_threads(1)
    s = SHAPES[shape_key]
    small = dataclasses.replace(s, batch=1, dim=s.groups * 2, length=64)
    run_once(impl, mode, make_inputs(small), torch.ones(1, small.dim, small.length))  # lazy inits
    inputs, cot = make_inputs(s), cotangent(s)
    gc.collect()
    try:  # reset the high-water mark to the current resident size
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass
    base = _rss_kb('VmRSS')
    y, grads = run_once(impl, mode, inputs, cot)
    peak = (_rss_kb('VmHWM') - base) / 1024
    error = None
    if ref_path:
        ref = torch.load(ref_path)
        if mode == 'fwd':
            error = rel_err(y, ref['fwd'])
        elif 'grads' in ref:
            error = max(rel_err(g, r) for g, r in zip(grads, ref['grads']))
    print(json.dumps({'peak_mb': peak, 'error': error}))


def measure_child(s: Shape, impl: str, mode: str, ref_path: Path | None) -> Dict[str, float | None]:
    cmd = [sys.executable, __file__, '--child', s.key, impl, mode, str(ref_path or '')]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    if proc.returncode != 0:
        print(f'  child run failed for {impl} {mode}: {proc.stderr.strip()[-300:]}', file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def skip_reason(s: Shape, impl: str, mode: str, mem_limit: float) -> str:
    if mode not in IMPL_MODES.get(impl, (mode,)):
        return f'{mode} not run'
    need = STATE_COPIES[impl, mode] * s.state_elems * 4
    return f'needs ~{need / 2**30:.0f} GB' if need > mem_limit else ''


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def fmt_ms(x: float | None) -> str:
    return '-' if x is None else (f'{x * 1e3:.1f}' if x < 10 else f'{x:.1f} s')


def table(rows: List[Dict[str, object]]) -> List[str]:
    head = ['shape', 'mode', 'thr', 'impl', 'median ms', 'runs', 'x ours', 'peak MB', 'error']
    lines = [head]
    for r in rows:
        lines.append([r['shape'], r['mode'], str(r['threads']), r['impl'],
                      r.get('skipped') or fmt_ms(r.get('time_s')), str(r.get('runs', '')),
                      f"{r['vs_ours']:.1f}" if r.get('vs_ours') else '',
                      f"{r['peak_mb']:.0f}" if r.get('peak_mb') is not None else '',
                      f"{r['error']:.1e}" if r.get('error') is not None else ''])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return ['| ' + ' | '.join(str(c).ljust(w) for c, w in zip(line, widths)) + ' |' for line in lines[:1]] + \
        ['|' + '|'.join('-' * (w + 2) for w in widths) + '|'] + \
        ['| ' + ' | '.join(str(c).ljust(w) for c, w in zip(line, widths)) + ' |' for line in lines[1:]]


def targets(rows: List[Dict[str, object]], threads: List[int]) -> List[str]:
    """The issue's goals, checked for each of our backends that ran."""
    def get(shape, mode, thr, impl, key='time_s'):
        return next((r.get(key) for r in rows if (r['shape'], r['mode'], r['threads'], r['impl']) ==
                     (shape, mode, thr, impl)), None)

    out = []

    def line(text, ok):
        out.append(f'- {text}: {"met" if ok else "NOT met"}')

    for thr in threads:
        for ours, mode in (('compiled', 'fwd'), ('torch', 'fwd'), ('compiled', 'fwd+bwd'), ('torch', 'fwd+bwd')):
            o = get('a', mode, thr, ours)
            if not o:
                continue
            goals = (('reference', 12), ('seq_full', 12), ('mambapy', 8)) if mode == 'fwd' else (('reference', 10),)
            for impl, goal in goals:
                t = get('a', mode, thr, impl)
                if t:
                    line(f'(a) {mode} {thr} thread(s): {ours} {t / o:.1f}x faster than {impl} (goal >= {goal}x)',
                         t / o >= goal)
            floor = get('a', 'fwd', thr, 'floor')
            if floor and mode == 'fwd':
                goal = 1.5 if ours == 'compiled' else 3  # the stretch goal is for a compiled path
                line(f'(a) fwd {thr} thread(s): {ours} = {o / floor:.2f}x the elementwise floor (goal <= {goal}x)',
                     o / floor <= goal)
    for ours, mode in (('compiled', 'fwd'), ('torch', 'fwd'), ('compiled', 'fwd+bwd'), ('torch', 'fwd+bwd')):
        for impl in (('reference', 'seq_full') if mode == 'fwd' else ('reference',)):
            o, r = get('a', mode, threads[0], ours, 'peak_mb'), get('a', mode, threads[0], impl, 'peak_mb')
            if o is not None and r:
                line(f'(a) {mode} peak extra memory: {ours} {o:.0f} MB vs {impl} {r:.0f} MB (goal <= 1/5)',
                     o <= r / 5)
    for ours in ('compiled', 'torch'):
        d = get('d', 'fwd', threads[0], ours, 'peak_mb')
        if d is not None:
            line(f'(d) fwd peak extra memory: {ours} {d:.0f} MB (goal well under 2 GB)', d < 1024)
    return out


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    p.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    p.add_argument('--impls', nargs='+', default=list(IMPLS), choices=list(IMPLS))
    p.add_argument('--repeats', type=int, default=5, help='timed runs per measurement (median reported)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--max-seconds', type=float, default=60, help='time budget per measurement (slow impls repeat less)')
    p.add_argument('--mem-limit-gb', type=float, default=8, help='skip runs estimated to need more memory')
    p.add_argument('--quick', action='store_true', help='times only: no float64 error check, no memory runs')
    p.add_argument('--json', type=Path, help='write the results as JSON')
    p.add_argument('--markdown', type=Path, help='write the results as a Markdown table')
    p.add_argument('--child', nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)
    if 'mambapy' in args.impls:
        try:
            import mambapy.pscan  # noqa: F401
        except ImportError:
            print('mambapy is not installed (pip install mambapy, the "bench" extra): skipping it', file=sys.stderr)
            args.impls = [i for i in args.impls if i != 'mambapy']
    if 'compiled' in args.impls:
        from basicsr_mambair.ops.scan import compiled

        reason = compiled.unavailable_reason()
        if reason is not None:
            print(f'compiled backend unavailable ({reason}): skipping it', file=sys.stderr)
            args.impls = [i for i in args.impls if i != 'compiled']
    mem_limit = args.mem_limit_gb * 2**30
    info = machine()
    print(f"Machine: {info['cpu']}, {info['logical_cores']} cores ({info['capability']}), torch {info['torch']}, "
          f"load average {' '.join(f'{x:.2f}' for x in info['load_average'])}", flush=True)
    rows: List[Dict[str, object]] = []
    for key in args.shapes:
        s = SHAPES[key]
        print(f'\n{s.label()}', flush=True)
        measured = {}
        if not args.quick:  # memory and error of each implementation, one fresh process per run
            with tempfile.TemporaryDirectory() as tmp:
                ref_path = Path(tmp) / 'ref64.pt'
                reference64(s, mem_limit, ref_path)
                for mode in s.modes:
                    for impl in args.impls:
                        if not skip_reason(s, impl, mode, mem_limit):
                            measured[impl, mode] = measure_child(s, impl, mode, ref_path)
        inputs, cot = make_inputs(s), cotangent(s)
        for thr in args.threads:
            torch.set_num_threads(thr)
            for mode in s.modes:
                times = {}
                for impl in [i for i in args.impls if mode in IMPL_MODES.get(i, (mode,))]:
                    row = {'shape': key, 'mode': mode, 'threads': thr, 'impl': impl,
                           'peak_mb': measured.get((impl, mode), {}).get('peak_mb'),
                           'error': measured.get((impl, mode), {}).get('error')}
                    why = skip_reason(s, impl, mode, mem_limit)
                    if why:
                        row['skipped'] = f'skipped ({why})'
                    else:
                        row['time_s'], row['runs'] = time_runs(functools.partial(run_once, impl, mode, inputs, cot),
                                                               args.repeats, args.warmup, args.max_seconds)
                        times[impl] = row['time_s']
                    rows.append(row)
                    print(f"  {thr} thr {mode:7s} {impl:9s} {row.get('skipped') or fmt_ms(row['time_s'])}", flush=True)
                if mode == 'fwd':
                    floor = elementwise_floor(s, args.repeats)
                    rows.append({'shape': key, 'mode': mode, 'threads': thr, 'impl': 'floor', 'time_s': floor,
                                 'runs': args.repeats})
                    times['floor'] = floor
                ours = times.get(OURS)
                for r in rows:
                    if (r['shape'], r['mode'], r['threads']) == (key, mode, thr) and ours and r.get('time_s'):
                        if r['impl'] == 'floor':
                            r['over_floor'] = {i: times[i] / r['time_s'] for i in ('compiled', 'torch') if i in times}
                        else:
                            r['vs_ours'] = r['time_s'] / ours
    info['loadavg_end'] = os.getloadavg()
    lines = table(rows)
    floors = [f"- ({r['shape']}) fwd, {r['threads']} thread(s), floor {fmt_ms(r['time_s'])} ms: " +
              ', '.join(f'{impl} = {x:.2f} x floor' for impl, x in r['over_floor'].items())
              for r in rows if r.get('over_floor')]
    goal_lines = targets(rows, args.threads)
    head = (f"Machine: {info['cpu']}, {info['logical_cores']} cores ({info['capability']}), torch {info['torch']}; "
            f"load average {' '.join(f'{x:.2f}' for x in info['load_average'])} (start), "
            f"{' '.join(f'{x:.2f}' for x in info['loadavg_end'])} (end)")
    print('\n' + head + '\n')
    print('\n'.join(lines))
    print('\n"x ours": that time / the time of ours (compiled; higher: ours faster). '
          '"peak MB": resident growth of a fresh process, 1 thread. "error": max |diff| / max |value| vs float64 '
          '(output for fwd, worst input gradient for fwd+bwd).')
    print('\n'.join(['', 'Elementwise floor (multiply, exp, multiply-add over (batch, dim, L, N) values):'] + floors))
    print('\n'.join(['', 'Targets:'] + goal_lines))
    if args.json:
        args.json.write_text(json.dumps({'machine': info, 'rows': rows, 'targets': goal_lines}, indent=1))
    if args.markdown:
        args.markdown.write_text('\n'.join([head, ''] + lines + ['', 'Elementwise floor:'] + floors +
                                           ['', 'Targets:'] + goal_lines) + '\n')


if __name__ == '__main__':
    main()
