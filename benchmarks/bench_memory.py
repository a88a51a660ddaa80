"""Activation memory per LQ pixel of each official configuration (CPU, float32), vs ``--tile auto``'s estimate.

The peak bytes allocated during a forward (``torch.profiler`` memory events; MambaIRv2 with deterministic
routing, its eval default) at two input sizes give the growth per pixel (the slope) and the fixed part (the
intercept); ``mambair-restore --tile auto`` plans with
:attr:`basicsr_mambair.archs.support.ArchInfo.bytes_per_pixel` (``scan_bytes_per_pixel`` where the fused CPU
scan runs), which should lie a little above the slope. Both depend on the scan backend (``MAMBAIR_SCAN``): the
fused CPU scan of ``auto`` needs about a quarter of what the others do in MambaIR.

    python benchmarks/bench_memory.py [--sides 48 96] [--presets lightSR_x2 v2_lightSR_x2 ...]
"""

from __future__ import annotations

import argparse
import os

import torch

from basicsr_mambair.archs.support import describe
from basicsr_mambair.memory import bytes_per_pixel, measure_peak_bytes
from basicsr_mambair.presets import get_preset

PRESETS = ('lightSR_x2', 'lightSR_x4', 'colorDN_15', 'CAR_10', 'classicSR_x2', 'classicSR_x4', 'realSR_x4', 'realDN',
           'v2_lightSR_x2', 'v2_lightSR_x4', 'v2_colorDN_15', 'v2_CAR_10', 'v2_classicSR_Small_x2',
           'v2_classicSR_Base_x2', 'v2_classicSR_Base_x4', 'v2_classicSR_Large_x2')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sides', type=int, nargs=2, default=[48, 96], help='two LQ input sides (px)')
    parser.add_argument('--presets', nargs='+', default=list(PRESETS), metavar='NAME', help='presets to measure')
    args = parser.parse_args()
    torch.set_num_threads(1)
    small, large = args.sides
    print(f'# CPU float32, torch {torch.__version__}, inputs {small}^2 and {large}^2 LQ pixels, '
          f'{os.cpu_count()} logical cores')
    print('| preset | d_inner | measured (kB / LQ pixel) | fixed part (MB) | estimate (kB / LQ pixel) |')
    print('|---|---|---|---|---|')
    for name in args.presets:
        preset = get_preset(name)
        net = preset.build().eval()
        peaks = {side: measure_peak_bytes(net, preset.in_channels, side) for side in (small, large)}
        slope = (peaks[large] - peaks[small]) / (large ** 2 - small ** 2)
        fixed = peaks[small] - slope * small ** 2
        width = preset.kwargs.get('embed_dim') or 2 * preset.kwargs['dim']
        d_inner = int(float(preset.kwargs.get('mlp_ratio', 2.0)) * width)
        estimate = bytes_per_pixel(describe(preset.arch_type, preset.kwargs), torch.device('cpu'))
        print(f'| {name} | {d_inner} | {slope / 1000:.1f} | {fixed / 1e6:.1f} | {estimate / 1000:.1f} |', flush=True)


if __name__ == '__main__':
    main()
