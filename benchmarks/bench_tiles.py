"""Peak memory and time of tiled vs whole-image inference (CPU), lightweight SR x2 MambaIR.

Each measurement runs in a fresh subprocess; the reported memory is the growth of the peak RSS
during the forward (model and input already in memory), so it shows what tiling bounds: with a
fixed tile the network's working memory stays flat as the image grows (only the output canvas,
about 2 x 4 x 3 x H x W x scale^2 bytes, grows with it); without tiles it grows with the image.

    python benchmarks/bench_tiles.py                       # sizes 128 256 512, tiles 0 (whole) 64 128
    python benchmarks/bench_tiles.py --sizes 128 --tiles 0 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from machine import describe

CHILD = r'''
import json, resource, sys, time
import torch
from basicsr_mambair.tiling import forward_tiled
from basicsr_mambair.presets import get_preset

size, tile, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
preset = get_preset('lightSR_x2')
net = preset.build().eval()
x = torch.rand(1, 3, size, size)
with torch.no_grad():
    forward_tiled(net, x[..., :16, :16], preset.scale, tile=16)  # warm-up (allocator, kernels)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    out = net(x) if tile == 0 else forward_tiled(net, x, preset.scale, tile=tile, overlap=8)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({'size': size, 'tile': tile, 'threads': threads, 'seconds': seconds,
                  'peak_growth_mib': (peak - before) / 1024, 'output_mib': out.numel() * 4 / 2**20}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[128, 256, 512], help='LR image sides (px)')
    parser.add_argument('--tiles', type=int, nargs='+', default=[0, 64, 128], help='tile sides (0 = whole image)')
    parser.add_argument('--threads', type=int, nargs='+', default=[1], help='torch threads')
    parser.add_argument('--json', help='also write the rows to this file')
    args = parser.parse_args()

    print(f'# light SR x2 MambaIR (905,016 params), CPU: {describe()}')
    print('| LR size | tile | threads | time (s) | peak RSS growth (MiB) | output (MiB) |')
    print('|---|---|---|---|---|---|')
    rows = []
    for threads in args.threads:
        for tile in args.tiles:
            for size in args.sizes:
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                out = subprocess.run([sys.executable, '-c', CHILD, str(size), str(tile), str(threads)], env=env,
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"| {size}x{size} | {tile or 'whole'} | {threads} | {row['seconds']:.2f} | "
                      f"{row['peak_growth_mib']:.0f} | {row['output_mib']:.1f} |", flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
