#!/usr/bin/env python
"""CPU forward time and peak memory of official MambaIR configs with each scan backend.

Cases (batch 1, random weights -- the scan's cost does not depend on the values):
    lightSR_x4 on a 128x128 and a 256x256 LR image, classicSR_x2 on 64x64.
Each (case, scan backend, thread count) runs in a fresh subprocess, so that its peak resident memory
(``ru_maxrss``) is its own: reported as the peak RSS and as the growth over the RSS after building the
model (activations + scan workspace). Time = median of ``--repeats`` forwards after warm-up.

The scan backend is chosen with ``basicsr_mambair.ops.scan_backend(...)``: ``compiled`` (the C kernel,
what ``auto`` runs on a CPU), ``torch`` (pure PyTorch) and ``reference`` (the sequential loop).

Usage::

    python benchmarks/bench_models.py                      # everything, 1 and 2 threads
    python benchmarks/bench_models.py --cases lightSR_x4@128 --threads 1 --repeats 3
    python benchmarks/bench_models.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine as machine_info

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

CASES = {  # name: (preset, LR side)
    'lightSR_x4@128': ('lightSR_x4', 128),
    'lightSR_x4@256': ('lightSR_x4', 256),
    'classicSR_x2@64': ('classicSR_x2', 64),
}
# MambaIRv2 beside the MambaIR of the same task (issue 14; eval, so deterministic routing):
#   --cases lightSR_x2@64 v2_lightSR_x2@64 classicSR_x2@64 v2_classicSR_Small_x2@64 v2_classicSR_Base_x2@64
V2_CASES = {
    'lightSR_x2@64': ('lightSR_x2', 64),
    'v2_lightSR_x2@64': ('v2_lightSR_x2', 64),
    'v2_classicSR_Small_x2@64': ('v2_classicSR_Small_x2', 64),
    'v2_classicSR_Base_x2@64': ('v2_classicSR_Base_x2', 64),
    'v2_classicSR_Large_x2@64': ('v2_classicSR_Large_x2', 64),
    'v2_lightSR_x4@128': ('v2_lightSR_x4', 128),
}
CASES.update(V2_CASES)
BACKENDS = ('compiled', 'torch', 'reference')


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # bytes on macOS, KiB on Linux


def measure(case: str, backend: str, threads: int, repeats: int, warmup: str) -> dict:
    """One measurement, in this process (called in a fresh subprocess by :func:`main`)."""
    import torch

    torch.set_num_threads(threads)
    from basicsr_mambair.ops import scan_backend
    from basicsr_mambair.presets import get_preset

    preset_name, side = CASES[case]
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = preset.build().eval()
    x = torch.rand(1, preset.in_channels, side, side)
    baseline = rss_bytes()
    times = []
    with torch.inference_mode(), scan_backend(backend):
        # Warm-up: thread pools, allocator, one-off kernel selection. 'small' warms up on 32x32 (for
        # the slow reference scan, whose time is its Python loop, a full-size warm-up only costs time).
        model(x if warmup == 'full' else x[..., :32, :32])
        for _ in range(repeats):
            start = time.perf_counter()
            y = model(x)
            times.append(time.perf_counter() - start)
    assert y.shape[-1] == side * preset.scale
    return {'case': case, 'backend': backend, 'threads': threads, 'times_s': times,
            'median_s': statistics.median(times), 'peak_rss_mib': peak_rss_bytes() / 2 ** 20,
            'growth_mib': (peak_rss_bytes() - baseline) / 2 ** 20}


def run_child(case: str, backend: str, threads: int, repeats: int, warmup: str, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = [sys.executable, __file__, '--child', json.dumps([case, backend, threads, repeats, warmup])]
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'case': case, 'backend': backend, 'threads': threads, 'error': f'timed out after {timeout:.0f} s'}
    if proc.returncode != 0:
        return {'case': case, 'backend': backend, 'threads': threads, 'error': proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cases', nargs='+', choices=list(CASES), default=list(CASES))
    parser.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    parser.add_argument('--backends', nargs='+', choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument('--repeats', type=int, default=5, help='timed forwards of the fast scan (median)')
    parser.add_argument('--reference-repeats', type=int, default=1,
                        help='timed forwards of the reference scan (slow: minutes at 256x256)')
    parser.add_argument('--timeout', type=float, default=3600, help='seconds per measurement')
    parser.add_argument('--json', type=Path, help='also write all results here')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        case, backend, threads, repeats, warmup = json.loads(args.child)
        print(json.dumps(measure(case, backend, threads, repeats, warmup)))
        return

    backends = args.backends
    machine = machine_info()
    print(f"machine: {machine['cpu']} ({machine['logical_cores']} logical cores); "
          f"python {machine['python']}, torch {machine['torch']}; load average {machine['load_average']}")
    results = []
    for case in args.cases:
        for threads in args.threads:
            for backend in backends:
                fast = backend != 'reference'
                result = run_child(case, backend, threads, args.repeats if fast else args.reference_repeats,
                                   'full' if fast else 'small', args.timeout)
                results.append(result)
                if 'error' in result:
                    print(f'{case:16s} {backend:11s} {threads} thr  ERROR {result["error"]}', flush=True)
                else:
                    print(f'{case:16s} {backend:11s} {threads} thr  {result["median_s"]:9.3f} s  '
                          f'peak RSS {result["peak_rss_mib"]:7.0f} MiB  (+{result["growth_mib"]:.0f} MiB for the '
                          f'forward)  [{len(result["times_s"])} run(s)]', flush=True)

    fast_backends = [b for b in backends if b != 'reference']
    print('\n| case | threads | ' + ' | '.join(f'{b} time (s) | {b} peak / growth (MiB)' for b in backends)
          + ' | ' + ' | '.join(f'{b} speed-up' for b in fast_backends) + ' |')
    print('|' + '---|' * (2 + 2 * len(backends) + len(fast_backends)))
    by_key = {(r['case'], r['threads'], r['backend']): r for r in results}
    for case in args.cases:
        for threads in args.threads:
            cells = []
            for backend in backends:
                r = by_key[(case, threads, backend)]
                cells += (['error', '-'] if 'error' in r else
                          [f"{r['median_s']:.3f}", f"{r['peak_rss_mib']:.0f} / {r['growth_mib']:.0f}"])
            ref = by_key.get((case, threads, 'reference'), {'error': 'not run'})
            for backend in fast_backends:
                fast = by_key[(case, threads, backend)]
                ok = 'error' not in fast and 'error' not in ref
                cells.append(f"{ref['median_s'] / fast['median_s']:.1f}x" if ok else '-')
            print(f'| {case} | {threads} | ' + ' | '.join(cells) + ' |')
    machine['load_average_end'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print(f"load average at the end: {machine['load_average_end']}")
    if args.json:
        args.json.write_text(json.dumps({'machine': machine, 'results': results}, indent=2))


if __name__ == '__main__':
    main()
