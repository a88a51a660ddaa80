#!/usr/bin/env python
"""ONNX export of the official light SR x2 network: export time, file size, ONNX Runtime time and memory.

Two formulations of the selective scan inside the graph are compared (random weights, batch 1):

* ``chunked`` -- what ``mambair-export`` writes (:mod:`basicsr_mambair.deploy.scan_graph`): three ONNX ``Scan``
  loops over a chunked time axis, about 2.8 sqrt(L) iterations over (dim, N, L / T) values;
* ``steps`` -- one ONNX ``Scan`` over all L = H * W time steps on (dim, N) states (built here, for comparison).

Graphs: static 64x64, static 256x256 and dynamic size (run at both sizes). Each ONNX Runtime measurement runs
in a fresh subprocess (its own peak RSS), single-threaded unless ``--threads``; time = median of ``--repeats``
runs after one warm-up (slow cases: one run). PyTorch's forward (the compiled C scan, ``auto``) is listed too.

Usage::

    python benchmarks/bench_onnx.py                       # everything (~30 min on our busy 2-core machine)
    python benchmarks/bench_onnx.py --formulations chunked --sides 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_models import peak_rss_bytes, rss_bytes
from machine import describe

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

PRESET = 'lightSR_x2'


def step_function(variant, opset: int):
    """The comparison formulation: one Scan over every time step, state (batch, G, N, H)."""
    from onnx import TensorProto, helper

    from basicsr_mambair.deploy.scan_graph import _Graph, _softplus
    from basicsr_mambair.ops.scan.onnx_node import DOMAIN

    g = _Graph('st_')
    shape_u, shape_b = g.op('Shape', 'u'), g.op('Shape', 'B')
    batch, dim, length = (g.dim(shape_u, i) for i in range(3))
    groups, n = g.dim(shape_b, 1), g.dim(shape_b, 2)
    per_group = g.op('Div', dim, groups)
    dt = g.op('Add', 'delta', g.op('Unsqueeze', 'delta_bias', g.ints(1)))
    dt = _softplus(g, dt)
    x = g.op('Mul', dt, 'u')

    def steps(t: str, middle: list[str]) -> str:  # (batch, X, L) -> (L, batch, G, ...)
        flat = g.op('Transpose', g.op('Reshape', t, g.op('Concat', g.ints(-1), length, axis=0)), perm=[1, 0])
        return g.op('Reshape', flat, g.op('Concat', length, batch, groups, *middle, axis=0))

    dts, xs = steps(dt, [g.ints(1), per_group]), steps(x, [g.ints(1), per_group])
    bs, cs = steps('B', [n, g.ints(1)]), steps('C', [n, g.ints(1)])
    a_gnh = g.op('Transpose', g.op('Reshape', 'A', g.op('Concat', groups, per_group, n, axis=0)), perm=[0, 2, 1])
    g.nodes.append(helper.make_node('Identity', [a_gnh], ['A_gnh1']))
    body = _Graph('body_')
    decay = body.op('Exp', body.op('Mul', 'dt_t', 'A_gnh1'))
    body.nodes.append(helper.make_node('Add', [body.op('Mul', decay, 'h_in'), body.op('Mul', 'x_t', 'B_t')], ['h_out']))
    body.nodes.append(helper.make_node('ReduceSum', [body.op('Mul', 'h_out', 'C_t'), body.ints(2)], ['y_t'],
                                       keepdims=1))
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(v, f32, None) for v in ('h_in', 'dt_t', 'x_t', 'B_t', 'C_t')]
    body_graph = helper.make_graph(body.nodes, 'step', inputs,
                                   [helper.make_tensor_value_info(v, f32, None) for v in ('h_out', 'y_t')])
    zeros = g.op('ConstantOfShape', g.op('Concat', batch, groups, n, per_group, axis=0),
                 value=helper.make_tensor('z', f32, [1], [0.0]))
    _, ys = g.op('Scan', zeros, dts, xs, bs, cs, body=body_graph, num_scan_inputs=4, outputs=2)
    y = g.op('Transpose', g.op('Reshape', ys, g.op('Concat', length, g.ints(-1), axis=0)), perm=[1, 0])
    y = g.op('Reshape', y, g.op('Concat', batch, dim, length, axis=0))
    y = g.op('Add', y, g.op('Mul', 'u', g.op('Unsqueeze', 'D', g.ints(1))))
    g.nodes.append(helper.make_node('Identity', [y], ['y']))
    return helper.make_function(DOMAIN, variant.op_type, variant.input_names, ['y'], g.nodes,
                                [helper.make_opsetid('', opset)])


def export(formulation: str, side: int | None, path: str) -> dict:
    """Export in this process (a child); returns time and size."""
    import torch

    from basicsr_mambair.deploy import export_onnx, scan_graph
    from basicsr_mambair.presets import get_preset

    if formulation == 'steps':
        scan_graph.scan_function = step_function
    torch.manual_seed(0)
    net = get_preset(PRESET).build().eval()
    start = time.perf_counter()
    export_onnx(net, path, size=side, overwrite=True)
    return {'export_s': time.perf_counter() - start, 'file_mb': os.path.getsize(path) / 1e6,
            'params': sum(p.numel() for p in net.parameters())}


def run_onnx(path: str, side: int, repeats: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).random((1, 3, side, side), dtype=np.float32)
    baseline = rss_bytes()
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        session.run(None, {'input': x})
        times.append(time.perf_counter() - start)
    times = times[1:] if repeats else times
    return {'median_s': statistics.median(times), 'runs': len(times), 'peak_rss_mib': peak_rss_bytes() / 2 ** 20,
            'growth_mib': (peak_rss_bytes() - baseline) / 2 ** 20}


def run_torch(side: int, repeats: int, threads: int) -> dict:
    import torch

    from basicsr_mambair.presets import get_preset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = get_preset(PRESET).build().eval()
    x = torch.rand(1, 3, side, side)
    baseline = rss_bytes()
    times = []
    with torch.inference_mode():
        for _ in range(1 + repeats):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return {'median_s': statistics.median(times[1:]), 'runs': repeats, 'peak_rss_mib': peak_rss_bytes() / 2 ** 20,
            'growth_mib': (peak_rss_bytes() - baseline) / 2 ** 20}


def child(task: list, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, '--child', json.dumps(task), '--threads', str(threads)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {'error': (proc.stderr.strip().splitlines() or ['?'])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--formulations', nargs='+', choices=['chunked', 'steps'], default=['chunked', 'steps'])
    parser.add_argument('--sides', nargs='+', type=int, default=[64, 256])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        result = {'export': export, 'onnx': run_onnx, 'torch': run_torch}[kind](
            *rest, *(() if kind == 'export' else (args.threads,)))
        print(json.dumps(result))
        return

    print(f'machine: {describe()}; onnxruntime threads {args.threads}', flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for formulation in args.formulations:
            for graph in [*args.sides, None]:
                path = os.path.join(tmp, f'{formulation}_{graph}.onnx')
                exp = child(['export', formulation, graph, path], args.threads)
                label = f'{graph}x{graph}' if graph else 'dynamic'
                print(f'{formulation:8s} {label:8s} export {exp}', flush=True)
                for side in ([graph] if graph else args.sides):
                    slow = formulation == 'steps' and side > 64
                    run = child(['onnx', path, side, 0 if slow else args.repeats], args.threads)
                    print(f'    run {side}x{side}: {run}', flush=True)
                    rows.append((formulation, label, exp, side, run))
        for side in args.sides:
            run = child(['torch', side, args.repeats], args.threads)
            print(f'pytorch {side}x{side}: {run}', flush=True)
            rows.append(('pytorch (compiled scan)', '-', {}, side, run))

    print('\n| scan in the graph | graph size | export (s) | file (MB) | input | time (s) | peak RSS / growth (MiB) |')
    print('|---|---|---|---|---|---|---|')
    for formulation, label, exp, side, run in rows:
        export_cells = (f"{exp['export_s']:.1f} | {exp['file_mb']:.2f}" if 'export_s' in exp
                        else ('- | -' if not exp else 'error | -'))
        run_cells = ('error | -' if 'error' in run else
                     f"{run['median_s']:.2f} | {run['peak_rss_mib']:.0f} / {run['growth_mib']:.0f}")
        print(f'| {formulation} | {label} | {export_cells} | {side}x{side} | {run_cells} |')
    print(f'load average at the end: {os.getloadavg()}')


if __name__ == '__main__':
    main()
