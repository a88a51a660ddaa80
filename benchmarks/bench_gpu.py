"""Benchmark on a CUDA GPU (a benchmark, not a test): the selective scan's backends and MambaIR training steps.

1. Scan, at the shapes of ``bench_scan.py`` ((a) light SR patch, (b) classic SR patch, (c) training batch,
   (d) large image): forward (no_grad) and forward+backward of ``triton``, ``torch`` and, where it imports,
   ``mamba_ssm`` (``cuda``), median of CUDA-event timings after warm-up, with the largest difference from
   the ``torch`` backend's outputs and gradients (both agree with float64 to ~1e-6: more than ~1e-5 is a bug).
   The forward at (d) is also given as achieved bandwidth on the scan's minimal traffic (u, delta, B, C read
   once, y written once) over the device's memory bandwidth (theoretical where PyTorch reports the memory
   clock and bus width, and a measured device-to-device copy).
2. Training steps (forward, L1 loss, backward, Adam) of light SR x2 (batch 16) and classic SR x2 (batch 4) on
   64 x 64 LQ patches in fp32, bf16 and fp16 (``train:use_amp``), images per second; optionally compiled.
3. ``--sweep``: other sets of the triton kernels' tile constants at shapes (c) and (d), to tune
   ``basicsr_mambair/ops/scan/triton.py`` on a new GPU (``benchmarks/triton_registers.py`` shows their
   registers without a GPU).

The issue's targets are printed with "met" / "NOT met". Usage::

    python benchmarks/bench_gpu.py                      # everything but the sweep
    python benchmarks/bench_gpu.py --scan-only --shapes c d
    python benchmarks/bench_gpu.py --sweep --json gpu.json
    python benchmarks/bench_gpu.py --sweep-only
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import SHAPES, Shape, make_inputs  # noqa: E402

from basicsr_mambair.ops import scan as ss  # noqa: E402
from basicsr_mambair.ops.scan import selective_scan  # noqa: E402
from basicsr_mambair.utils.amp import MixedPrecision  # noqa: E402

DEVICE = 'cuda'
GRAD_KEYS = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')
TRAIN_SETUPS = {  # preset, batch, LQ patch side (gt_size 128 at x2, as the official option files)
    'light SR x2': ('lightSR_x2', 16, 64),
    'classic SR x2': ('classicSR_x2', 4, 64),
}
# --sweep: sets of the triton backend's constants tried against the shipped ones (registers per thread on
# sm_90 in brackets, from benchmarks/triton_registers.py), forward at (d) and forward+backward at (c)
SWEEP = [
    {'INFER_BLOCK_D': 4, 'INFER_BLOCK_T': 32, 'INFER_WARPS': 4},  # (96) more programs, 20 warps / SM
    {'INFER_BLOCK_D': 8, 'INFER_BLOCK_T': 32, 'INFER_WARPS': 8},  # (102) B / C loaded for 8 channels
    {'INFER_BLOCK_D': 2, 'INFER_BLOCK_T': 64, 'INFER_WARPS': 4},  # (160)
    {'INFER_BLOCK_D': 4, 'INFER_BLOCK_T': 128, 'INFER_WARPS': 8},  # (255) fewer carries, 8 warps / SM
    {'PROGRAMS_PER_SM': 2}, {'PROGRAMS_PER_SM': 8},  # fewer / more time chunks at batch 1
    {'TRAIN_BLOCK_T': 16},  # (95 forward, 237 backward)
    {'TRAIN_BLOCK_D': 8, 'TRAIN_WARPS': 8},
    {'BWD_BLOCK_D': 4, 'BWD_WARPS': 16},  # (102) 16 warps / SM
    {'BWD_BLOCK_D': 2, 'BWD_WARPS': 8},  # (102) two programs / SM
    {'BWD_BLOCK_D': 4, 'BWD_WARPS': 8},  # (180)
    {'BWD_ATOMIC': False},  # per-block dB / dC buffers (the deterministic path)
]

def gpu_time(fn: Callable[[], object], repeats: int, warmup: int = 2, budget_s: float = 20) -> float:
    """Median seconds of ``fn`` on the GPU (CUDA events), fewer repeats when one run is slow."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    start_all = time.perf_counter()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
        if time.perf_counter() - start_all > budget_s:
            break
    return statistics.median(samples)


def device_info() -> Dict[str, object]:
    """The GPU, its theoretical and copy bandwidth, the software versions."""
    props = torch.cuda.get_device_properties(0)
    info: Dict[str, object] = {'device': props.name, 'sms': props.multi_processor_count,
                               'memory_gb': props.total_memory / 2**30, 'torch': torch.__version__,
                               'cuda': torch.version.cuda}
    try:
        import triton

        info['triton'] = triton.__version__
    except ImportError:
        info['triton'] = None
    clock, bus = getattr(props, 'memory_clock_rate', None), getattr(props, 'memory_bus_width', None)
    if clock and bus:  # kHz, bits; double data rate
        info['peak_bandwidth_gbs'] = 2 * clock * 1e3 * bus / 8 / 1e9
    src = torch.empty(1 << 28, device='cuda')  # 1 GiB
    t = gpu_time(functools.partial(torch.empty_like(src).copy_, src), 10)
    info['copy_bandwidth_gbs'] = 2 * src.numel() * 4 / t / 1e9  # bytes read + written
    info['mamba_ssm'] = ss.cuda.unavailable_reason() or 'imports'
    return info


def minimal_bytes(s: Shape) -> int:
    """The forward's least traffic: u, delta (batch, dim, L), B, C (batch, G, N, L) read once, y written once."""
    return 4 * (3 * s.batch * s.dim * s.length + 2 * s.batch * s.groups * s.n * s.length)


def scan_call(backend: str, mode: str, inputs: Dict[str, torch.Tensor], cot: torch.Tensor) -> Callable[[], object]:
    """One forward (no_grad) or forward+backward of ``backend`` on CUDA ``inputs`` (MambaIR's options)."""
    def run():
        if mode == 'fwd':
            with torch.no_grad():
                return selective_scan(inputs['u'], inputs['delta'], inputs['A'], inputs['B'], inputs['C'],
                                      inputs['D'], delta_bias=inputs['delta_bias'], delta_softplus=True,
                                      backend=backend)
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        y = selective_scan(leaves['u'], leaves['delta'], leaves['A'], leaves['B'], leaves['C'], leaves['D'],
                           delta_bias=leaves['delta_bias'], delta_softplus=True, backend=backend)
        return y, torch.autograd.grad(y, [leaves[k] for k in GRAD_KEYS], cot)
    return run


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def bench_scan(shapes: List[str], backends: List[str], repeats: int) -> List[Dict[str, object]]:
    rows = []
    for key in shapes:
        s = SHAPES[key]
        inputs = {k: v.to(DEVICE) for k, v in make_inputs(s).items()}
        cot = torch.randn(s.batch, s.dim, s.length, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        print(f'\n{s.label()}', flush=True)
        for mode in ('fwd', 'fwd+bwd'):
            results = {}
            for backend in backends:
                fn = scan_call(backend, mode, inputs, cot)
                out = fn()
                slow = backend == 'torch'  # thousands of small kernels per call: seconds at (d)
                t = gpu_time(fn, repeats, warmup=1 if slow else 2, budget_s=8 if slow else 10)
                y = out if mode == 'fwd' else out[0]
                results[backend] = out
                row = {'shape': key, 'mode': mode, 'backend': backend, 'time_s': t}
                if backend != 'torch' and 'torch' in results:
                    ref = results['torch']
                    row['error_vs_torch'] = (rel_err(y, ref) if mode == 'fwd' else
                                             max(rel_err(a, b) for a, b in zip((y, *out[1]), (ref[0], *ref[1]))))
                if mode == 'fwd':
                    row['bandwidth_gbs'] = minimal_bytes(s) / t / 1e9
                rows.append(row)
                extra = f", {row['bandwidth_gbs']:.0f} GB/s on minimal traffic" if mode == 'fwd' else ''
                err = f", error vs torch {row['error_vs_torch']:.1e}" if 'error_vs_torch' in row else ''
                print(f'  {mode:7s} {backend:7s} {t * 1e3:9.3f} ms{extra}{err}', flush=True)
            del results
        del inputs, cot
        torch.cuda.empty_cache()
    return rows


def scan_backends() -> List[str]:
    """torch first (the others are compared with it), then ours, then mamba_ssm where it imports."""
    names = ['torch']
    if ss.triton.unavailable_reason() is None:
        names.append('triton')
    else:
        print(f'triton backend unavailable: {ss.triton.unavailable_reason()}', file=sys.stderr)
    if ss.cuda.unavailable_reason() is None:
        names.append('cuda')
    return names


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, amp: MixedPrecision, lq: torch.Tensor,
               gt: torch.Tensor) -> None:
    """One step as MambaIRModel.optimize_parameters takes it: autocast forward, float32 L1 loss, (scaled)
    backward, step."""
    optimizer.zero_grad(set_to_none=True)
    with amp.autocast():
        out = net(lq)
    amp.backward(torch.nn.functional.l1_loss(out.float(), gt))
    amp.unscale(optimizer)
    amp.step(optimizer)


def time_training(name: str, precision: str, repeats: int, compile_: bool) -> Dict[str, object]:
    from basicsr.utils.registry import ARCH_REGISTRY

    from basicsr_mambair.presets import get_preset

    preset_name, batch, side = TRAIN_SETUPS[name]
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get(preset.arch_type)(**preset.kwargs).to(DEVICE).train()
    if compile_:
        net.compile()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    amp = MixedPrecision(None if precision == 'fp32' else precision, DEVICE)
    lq = torch.rand(batch, 3, side, side, device=DEVICE)
    gt = torch.rand(batch, 3, side * preset.scale, side * preset.scale, device=DEVICE)
    torch.cuda.reset_peak_memory_stats()
    t = gpu_time(functools.partial(train_step, net, optimizer, amp, lq, gt), repeats, warmup=3)
    return {'setup': name, 'precision': precision, 'compiled': compile_, 'step_s': t, 'images_per_s': batch / t,
            'peak_memory_gb': torch.cuda.max_memory_allocated() / 2**30}


def bench_training(setups: List[str], precisions: List[str], repeats: int, compile_: bool) -> List[Dict[str, object]]:
    """Images per second of whole training steps."""
    rows = []
    for name in setups:
        preset_name, batch, side = TRAIN_SETUPS[name]
        print(f'\ntraining step: {name} (MambaIR {preset_name}), batch {batch}, LQ {side}x{side}, scan '
              f'{ss.get_backend("cuda")}{", compiled" if compile_ else ""}', flush=True)
        for precision in precisions:
            row = time_training(name, precision, repeats, compile_)
            rows.append(row)
            print(f"  {precision:5s} {row['step_s'] * 1e3:8.1f} ms/step  {row['images_per_s']:7.1f} images/s  "
                  f"peak {row['peak_memory_gb']:.1f} GB", flush=True)
            torch.cuda.empty_cache()
    return rows


def sweep(repeats: int) -> List[Dict[str, object]]:
    """Each set of SWEEP against the shipped constants: fwd at (d), fwd+bwd at (c), relative times."""
    tb = ss.triton
    cases = [('d', 'fwd'), ('c', 'fwd+bwd')]
    data = {}
    for key, _ in cases:
        s = SHAPES[key]
        data[key] = ({k: v.to(DEVICE) for k, v in make_inputs(s).items()},
                     torch.randn(s.batch, s.dim, s.length, generator=torch.Generator().manual_seed(1)).to(DEVICE))

    def measure() -> Dict[str, float]:
        return {f'{k} {m}': gpu_time(scan_call('triton', m, *data[k]), repeats) for k, m in cases}

    base = measure()
    rows = [{'constants': 'shipped', **base}]
    print('\nsweep of the triton constants (time relative to the shipped set: < 1 is faster)')
    print(f"  shipped: {', '.join(f'{k} {v * 1e3:.3f} ms' for k, v in base.items())}")
    for constants in SWEEP:
        with contextlib.ExitStack() as stack:
            for name, value in constants.items():
                stack.enter_context(patched(tb, name, value))
            times = measure()
        rows.append({'constants': constants, **times})
        print(f"  {constants}: " + ', '.join(f'{k} {times[k] / base[k]:.2f}' for k in base), flush=True)
    return rows


@contextlib.contextmanager
def patched(module, name: str, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def targets(info: Dict[str, object], scan_rows: List[Dict[str, object]],
            train_rows: List[Dict[str, object]]) -> List[str]:
    def t(shape, mode, backend):
        return next((r['time_s'] for r in scan_rows if (r['shape'], r['mode'], r['backend']) == (shape, mode, backend)),
                    None)

    out = []

    def line(text, ok):
        out.append(f'- {text}: {"met" if ok else "NOT met"}')

    tri, tor, mam = t('c', 'fwd+bwd', 'triton'), t('c', 'fwd+bwd', 'torch'), t('c', 'fwd+bwd', 'cuda')
    if tri and tor:
        line(f'(c) fwd+bwd: triton {tor / tri:.1f}x faster than torch on this GPU (goal >= 10x)', tor / tri >= 10)
    if tri and mam:
        line(f'(c) fwd+bwd: triton takes {tri / mam:.2f}x mamba_ssm\'s time (goal <= 1.5x)', tri / mam <= 1.5)
    d = next((r for r in scan_rows if (r['shape'], r['mode'], r['backend']) == ('d', 'fwd', 'triton')), None)
    if d:
        for label in ('peak_bandwidth_gbs', 'copy_bandwidth_gbs'):
            if info.get(label):
                ratio = d['bandwidth_gbs'] / info[label]
                line(f"(d) fwd: triton reaches {ratio:.0%} of the {label.split('_')[0]} bandwidth "
                     f"({d['bandwidth_gbs']:.0f} of {info[label]:.0f} GB/s, minimal traffic) (goal >= 40%)",
                     ratio >= 0.4)
    light = {r['precision']: r['images_per_s'] for r in train_rows if r['setup'] == 'light SR x2'
             and not r['compiled']}
    if 'fp32' in light and 'bf16' in light:
        line(f"light SR x2 training: bf16 {light['bf16'] / light['fp32']:.2f}x the fp32 throughput (goal >= 1.5x)",
             light['bf16'] / light['fp32'] >= 1.5)
    return out


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    p.add_argument('--repeats', type=int, default=20, help='timed runs per measurement (median reported)')
    p.add_argument('--precisions', nargs='+', default=['fp32', 'bf16', 'fp16'], choices=['fp32', 'bf16', 'fp16'])
    p.add_argument('--setups', nargs='+', default=list(TRAIN_SETUPS), choices=list(TRAIN_SETUPS))
    p.add_argument('--compile', action='store_true', help='also time compiled training steps (torch.compile)')
    p.add_argument('--scan-only', action='store_true', help='no training steps')
    p.add_argument('--train-only', action='store_true', help='no scan timings')
    p.add_argument('--sweep', action='store_true', help='time the triton kernels with other tile constants')
    p.add_argument('--sweep-only', action='store_true', help='only the sweep')
    p.add_argument('--json', type=Path, help='write every result as JSON')
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('bench_gpu.py needs a CUDA GPU')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what training uses
    info = device_info()
    print('Device: ' + ', '.join(f'{k} {v:.0f}' if isinstance(v, float) else f'{k} {v}' for k, v in info.items()),
          flush=True)
    results: Dict[str, object] = {'device': info, 'scan': [], 'training': []}
    if args.sweep_only:
        args.scan_only = args.train_only = args.sweep = True
    if not args.train_only:
        results['scan'] = bench_scan(args.shapes, scan_backends(), args.repeats)
    if not args.scan_only:
        results['training'] = bench_training(args.setups, args.precisions, max(5, args.repeats // 2), False)
        if args.compile:
            results['training'] += bench_training(args.setups, args.precisions, max(5, args.repeats // 2), True)
    if args.sweep:
        results['sweep'] = sweep(max(5, args.repeats // 2))
    lines = targets(info, results['scan'], results['training'])
    if lines:
        print('\nTargets:\n' + '\n'.join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == '__main__':
    main()
