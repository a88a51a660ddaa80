#!/usr/bin/env python
"""CPU speed and memory of official MambaIR configs: against SwinIR, a training step, peak memory, scan backends.

Sections (``--sections``; default ``swinir train memory``), every measurement in a fresh subprocess with
``OMP_NUM_THREADS`` set, batch 1 and random weights unless stated (the cost does not depend on the values):

``swinir``
    MambaIR beside the SwinIR model of the papers' comparison, same input: light SR x4 on a 128x128 LR
    image (MambaIR-light 924,492 parameters, SwinIR-S 929,628) and classic SR x2 on 64x64 (20.4M, 11.8M).
    SwinIR is spandrel's class with the paper's configurations (``pip install spandrel``, in the ``bench``
    extra). MambaIR runs its default CPU path (``compiled``: the fused SS2D scan) and the path before it
    (``compiled-unfused``: cross_scan copies and the flat kernel). All models live in one process and are
    timed in turn (A B C A B C ...); the median of ``--repeats`` rounds, as wall time and as the CPU time of
    the process (1 thread: the calling thread's; robust when other programs share the cores). Ratio =
    MambaIR / SwinIR.
``train``
    One training step (forward, L1 loss, backward, Adam) of light SR x2 at batch 4 on 64x64 patches,
    ``compiled`` against ``compiled-unfused``, interleaved in one process.
``memory``
    Light SR x4 forward at 256x256 with each of ``compiled`` and ``compiled-unfused``, each in its own
    process: the allocator's peak during the forward (``torch.profiler`` memory events) and the growth of the
    peak resident set over the model's.
``backends``
    The forward with each scan backend of ``--backends`` (``compiled``, ``compiled-unfused``, ``torch``,
    ``reference``), each in a fresh process: median time, peak RSS and its growth, speed-up over ``reference``.

Usage::

    python benchmarks/bench_models.py                                  # swinir, train, memory; 1 and 2 threads
    python benchmarks/bench_models.py --sections swinir --threads 1 --repeats 3
    python benchmarks/bench_models.py --sections backends --backends compiled torch
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

from machine import describe

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
# SwinIR (Liang et al., 2021) in the configurations MambaIR's papers compare with, as in SwinIR's own test code.
SWINIR = {
    'lightSR_x4': ('SwinIR-S x4', dict(upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1.0,
                                       depths=[6] * 4, embed_dim=60, num_heads=[6] * 4, mlp_ratio=2,
                                       upsampler='pixelshuffledirect', resi_connection='1conv')),
    'classicSR_x2': ('SwinIR x2', dict(upscale=2, in_chans=3, img_size=64, window_size=8, img_range=1.0,
                                       depths=[6] * 6, embed_dim=180, num_heads=[6] * 6, mlp_ratio=2,
                                       upsampler='pixelshuffle', resi_connection='1conv')),
}
SWINIR_CASES = ('lightSR_x4@128', 'classicSR_x2@64')
OURS = ('compiled', 'compiled-unfused')  # the fused SS2D scan (auto on a CPU) and the path before it
BACKENDS = ('compiled', 'compiled-unfused', 'torch', 'reference')
SECTIONS = ('swinir', 'train', 'memory', 'backends')
TRAIN = ('lightSR_x2', 4, 64)  # preset, batch, LR patch side
MEMORY_CASE = 'lightSR_x4@256'


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


def cpu_clock(threads: int):
    """The CPU-time clock of a measurement: the calling thread's with 1 thread (all the work runs on it),
    else the process's (the sum over its threads: compare it only between runs with the same threads)."""
    return time.thread_time if threads == 1 else time.process_time


def timed_rounds(variants: dict, repeats: int, threads: int) -> dict:
    """Run every variant (name: callable) once to warm up, then ``repeats`` rounds of one call each, in turn.
    Returns name: {'wall_s': [...], 'cpu_s': [...]}."""
    clock = cpu_clock(threads)
    for fn in variants.values():
        fn()
    times = {name: {'wall_s': [], 'cpu_s': []} for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            wall, cpu = time.perf_counter(), clock()
            fn()
            times[name]['cpu_s'].append(clock() - cpu)
            times[name]['wall_s'].append(time.perf_counter() - wall)
    return times


def swinir_model(preset_name: str):
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(**SWINIR[preset_name][1])


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ children
def child_swinir(case: str, threads: int, repeats: int) -> dict:
    """MambaIR (each of OURS) and its SwinIR in one process, timed in turn."""
    import torch

    from basicsr_mambair.ops import scan_backend
    from basicsr_mambair.presets import get_preset

    preset_name, side = CASES[case]
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    ours, theirs = preset.build().eval(), swinir_model(preset_name).eval()
    x = torch.rand(1, preset.in_channels, side, side)

    def run_ours(backend: str):
        def run():
            with scan_backend(backend):
                return ours(x)
        return run

    variants = {'swinir': lambda: theirs(x), **{b: run_ours(b) for b in OURS}}
    with torch.inference_mode():
        assert ours(x).shape == theirs(x).shape == (1, 3, side * preset.scale, side * preset.scale)
        times = timed_rounds(variants, repeats, threads)
    return {'params': {'swinir': n_params(theirs), 'mambair': n_params(ours)}, 'times': times}


def child_train(threads: int, repeats: int) -> dict:
    """Training steps with each of OURS, interleaved (one model and optimizer; the steps change the weights,
    which the cost does not depend on)."""
    import torch
    import torch.nn.functional as F

    from basicsr_mambair.ops import scan_backend
    from basicsr_mambair.presets import get_preset

    preset_name, batch, side = TRAIN
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = preset.build().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, preset.in_channels, side, side)
    target = torch.rand(batch, preset.in_channels, side * preset.scale, side * preset.scale)

    def step(backend: str):
        def run():
            with scan_backend(backend):
                optimizer.zero_grad(set_to_none=True)
                F.l1_loss(model(x), target).backward()
                optimizer.step()
        return run

    return {'times': timed_rounds({b: step(b) for b in OURS}, repeats, threads)}


def child_memory(backend: str) -> dict:
    """One forward after a small warm-up: the allocator's peak and the peak RSS growth."""
    import torch

    from basicsr_mambair.memory import measure_peak_bytes
    from basicsr_mambair.ops import scan_backend
    from basicsr_mambair.presets import get_preset

    preset_name, side = CASES[MEMORY_CASE]
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = preset.build().eval()
    with torch.inference_mode(), scan_backend(backend):
        model(torch.rand(1, preset.in_channels, 32, 32))
        baseline = rss_bytes()
        model(torch.rand(1, preset.in_channels, side, side))
        growth = peak_rss_bytes() - baseline
    with scan_backend(backend):
        allocated = measure_peak_bytes(model, preset.in_channels, side)
    return {'backend': backend, 'allocated_mib': allocated / 2 ** 20, 'rss_growth_mib': growth / 2 ** 20}


def child_backend(case: str, backend: str, repeats: int) -> dict:
    """One (case, backend): median forward time, peak RSS and its growth during the forwards."""
    import torch

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
        # Warm-up: thread pools, allocator, one-off kernel selection; the slow reference scan, whose time
        # is its Python loop, warms up on 32x32 only.
        model(x if backend != 'reference' else x[..., :32, :32])
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return {'median_s': statistics.median(times), 'times_s': times, 'peak_rss_mib': peak_rss_bytes() / 2 ** 20,
            'growth_mib': (peak_rss_bytes() - baseline) / 2 ** 20}


CHILDREN = {'swinir': child_swinir, 'train': child_train, 'memory': child_memory, 'backend': child_backend}


def run_child(kind: str, args: list, threads: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, '--child', json.dumps([kind, threads, args])]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'timed out after {timeout:.0f} s'}
    if proc.returncode != 0:
        return {'error': (proc.stderr.strip().splitlines() or [f'exit status {proc.returncode}'])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ sections
def median(times: dict, key: str) -> float:
    return statistics.median(times[key])


def section_swinir(args: argparse.Namespace) -> list:
    print('\n### MambaIR vs SwinIR (forward, batch 1; median of', args.repeats, 'interleaved rounds)\n')
    print('| case | threads | SwinIR (s) | MambaIR fused (s) | MambaIR unfused (s) | fused / SwinIR | '
          'unfused / SwinIR | fused / SwinIR, CPU time |')
    print('|---|---|---|---|---|---|---|---|')
    results = []
    for case in SWINIR_CASES:
        for threads in args.threads:
            r = run_child('swinir', [case, threads, args.repeats], threads, args.timeout)
            r.update(case=case, threads=threads)
            results.append(r)
            if 'error' in r:
                print(f'| {case} | {threads} | error: {r["error"]} |')
                continue
            t = r['times']
            wall = {k: median(v, 'wall_s') for k, v in t.items()}
            cpu = {k: median(v, 'cpu_s') for k, v in t.items()}
            name = SWINIR[CASES[case][0]][0]
            print(f"| {case} vs {name} ({r['params']['mambair']:,} / {r['params']['swinir']:,} params) | {threads} | "
                  f"{wall['swinir']:.3f} | {wall['compiled']:.3f} | {wall['compiled-unfused']:.3f} | "
                  f"{wall['compiled'] / wall['swinir']:.2f} | {wall['compiled-unfused'] / wall['swinir']:.2f} | "
                  f"{cpu['compiled'] / cpu['swinir']:.2f} |", flush=True)
    return results


def section_train(args: argparse.Namespace) -> list:
    preset_name, batch, side = TRAIN
    print(f'\n### Training step ({preset_name}, batch {batch}, {side}x{side}; median of {args.repeats} '
          'interleaved rounds)\n')
    print('| threads | fused (s) | unfused (s) | speed-up | speed-up, CPU time |')
    print('|---|---|---|---|---|')
    results = []
    for threads in args.threads:
        r = run_child('train', [threads, args.repeats], threads, args.timeout)
        r.update(threads=threads)
        results.append(r)
        if 'error' in r:
            print(f'| {threads} | error: {r["error"]} |')
            continue
        t = r['times']
        wall = {k: median(v, 'wall_s') for k, v in t.items()}
        cpu = {k: median(v, 'cpu_s') for k, v in t.items()}
        print(f"| {threads} | {wall['compiled']:.3f} | {wall['compiled-unfused']:.3f} | "
              f"{wall['compiled-unfused'] / wall['compiled']:.2f}x | "
              f"{cpu['compiled-unfused'] / cpu['compiled']:.2f}x |", flush=True)
    return results


def section_memory(args: argparse.Namespace) -> list:
    print(f'\n### Peak memory ({MEMORY_CASE}, forward, 1 thread)\n')
    print('| scan | allocator peak (MiB) | peak RSS growth (MiB) |')
    print('|---|---|---|')
    results = []
    for backend in OURS:
        r = run_child('memory', [backend], 1, args.timeout)
        results.append(r)
        if 'error' in r:
            print(f'| {backend} | error: {r["error"]} |')
        else:
            print(f"| {backend} | {r['allocated_mib']:.0f} | {r['rss_growth_mib']:.0f} |", flush=True)
    return results


def section_backends(args: argparse.Namespace) -> list:
    print('\n### Forward per scan backend (median of', args.repeats, 'runs; reference:', args.reference_repeats,
          ')\n')
    results = []
    for case in args.cases:
        for threads in args.threads:
            for backend in args.backends:
                repeats = args.repeats if backend != 'reference' else args.reference_repeats
                r = run_child('backend', [case, backend, repeats], threads, args.timeout)
                r.update(case=case, backend=backend, threads=threads)
                results.append(r)
    fast = [b for b in args.backends if b != 'reference']
    print('| case | threads | ' + ' | '.join(f'{b} time (s) | {b} peak / growth (MiB)' for b in args.backends)
          + (' | ' + ' | '.join(f'{b} speed-up' for b in fast) if 'reference' in args.backends else '') + ' |')
    print('|' + '---|' * (2 + 2 * len(args.backends) + (len(fast) if 'reference' in args.backends else 0)))
    by_key = {(r['case'], r['threads'], r['backend']): r for r in results}
    for case in args.cases:
        for threads in args.threads:
            cells = []
            for backend in args.backends:
                r = by_key[(case, threads, backend)]
                cells += (['error', '-'] if 'error' in r else
                          [f"{r['median_s']:.3f}", f"{r['peak_rss_mib']:.0f} / {r['growth_mib']:.0f}"])
            if 'reference' in args.backends:
                ref = by_key[(case, threads, 'reference')]
                for backend in fast:
                    r = by_key[(case, threads, backend)]
                    ok = 'error' not in r and 'error' not in ref
                    cells.append(f"{ref['median_s'] / r['median_s']:.1f}x" if ok else '-')
            print(f'| {case} | {threads} | ' + ' | '.join(cells) + ' |', flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sections', nargs='+', choices=SECTIONS, default=['swinir', 'train', 'memory'])
    parser.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds (median)')
    parser.add_argument('--cases', nargs='+', choices=list(CASES), default=list(CASES), help='backends section')
    parser.add_argument('--backends', nargs='+', choices=BACKENDS, default=list(BACKENDS), help='backends section')
    parser.add_argument('--reference-repeats', type=int, default=1,
                        help='timed forwards of the reference scan (slow: minutes at 256x256)')
    parser.add_argument('--timeout', type=float, default=3600, help='seconds per subprocess')
    parser.add_argument('--json', type=Path, help='also write all results here')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, threads, child_args = json.loads(args.child)
        import torch

        torch.set_num_threads(threads)
        print(json.dumps(CHILDREN[kind](*child_args)))
        return

    print(f'machine: {describe()}', flush=True)
    runners = {'swinir': section_swinir, 'train': section_train, 'memory': section_memory,
               'backends': section_backends}
    results = {name: runners[name](args) for name in args.sections}
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print(f'\nload average at the end: {load}')
    if args.json:
        args.json.write_text(json.dumps({'machine': describe(), 'load_average_end': load, 'results': results},
                                        indent=2))


if __name__ == '__main__':
    main()
