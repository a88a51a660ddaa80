"""Compile the ``triton`` scan's kernels for a GPU architecture on a machine without a GPU and report their
registers per thread and spills (ptxas, shipped with Triton), for the tile constants of
``basicsr_mambair/ops/scan/triton.py``: a check that the kernels compile for a real GPU (the CPU tests run
them in Triton's interpreter, which accepts things the compiler does not) and a first look at occupancy.

Usage::

    python benchmarks/triton_registers.py               # sm_90 (H100 / H200), MambaIR's N = 16
    python benchmarks/triton_registers.py --arch 80 --json regs.json

Run it without ``TRITON_INTERPRET=1`` in the environment (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def kernel_variants(n: int) -> List[tuple]:
    """(label, kernel, constexprs, num_warps) of every launch shape the backend uses, MambaIR's options."""
    from basicsr_mambair.ops.scan import triton as tb
    from basicsr_mambair.ops.scan import triton_kernels as k

    common = dict(N=n, BLOCK_N=1 << (n - 1).bit_length(), SOFTPLUS=True, HAS_BIAS=True)
    infer = dict(common, BLOCK_D=tb.INFER_BLOCK_D, BLOCK_T=tb.INFER_BLOCK_T)
    train = dict(common, BLOCK_D=tb.TRAIN_BLOCK_D, BLOCK_T=tb.TRAIN_BLOCK_T)
    return [
        ('forward (inference)', k.scan_fwd_kernel, dict(infer, HAS_D=True, SAVE_CKPT=False, SAVE_END=True),
         tb.INFER_WARPS),
        ('forward (training)', k.scan_fwd_kernel, dict(train, HAS_D=True, SAVE_CKPT=True, SAVE_END=True),
         tb.TRAIN_WARPS),
        ('chunk chaining', k.scan_chain_kernel, dict(N=n, BLOCK=tb.CHAIN_BLOCK), 4),
        ('chunk fix-up', k.scan_fix_kernel, dict(infer, SAVE_CKPT=False), tb.INFER_WARPS),
        ('backward', k.scan_bwd_kernel, dict(common, BLOCK_D=tb.BWD_BLOCK_D, BLOCK_T=tb.TRAIN_BLOCK_T, HAS_D=True,
                                             HAS_DLAST=False, ATOMIC=tb.BWD_ATOMIC), tb.BWD_WARPS),
    ]


def compile_for(kernel, constexprs: Dict[str, object], num_warps: int, arch: int) -> Dict[str, object]:
    """PTX of ``kernel`` for sm_``arch`` (no GPU needed), assembled by ptxas -v: registers and spill bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = kernel.arg_names
    signature = {name: 'constexpr' if name in constexprs else ('*fp32' if name.endswith('_ptr') else 'i32')
                 for name in params}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(params.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget('cuda', arch, 32), options={'num_warps': num_warps})
    ptxas = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas'
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / 'kernel.ptx'
        ptx.write_text(compiled.asm['ptx'])
        target = re.search(r'\.target\s+(\S+)', compiled.asm['ptx']).group(1)  # sm_90a on Hopper
        out = subprocess.run([str(ptxas), f'-arch={target}', '-v', str(ptx), '-o', os.devnull], capture_output=True,
                             text=True, check=True).stderr
    return {'registers': int(re.search(r'Used (\d+) registers', out).group(1)),
            'spill_bytes': int(re.search(r'(\d+) bytes spill stores', out).group(1)), 'num_warps': num_warps}


def main(argv: List[str] | None = None) -> Dict[str, Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', type=int, default=90, help='compute capability x 10 (80: A100, 90: H100/H200)')
    p.add_argument('--n', type=int, default=16, help='state size N')
    p.add_argument('--json', type=Path)
    args = p.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET') == '1':
        sys.exit('unset TRITON_INTERPRET: the interpreter replaces the compiler')
    report = {}
    for label, kernel, constexprs, warps in kernel_variants(args.n):
        r = compile_for(kernel, constexprs, warps, args.arch)
        report[label] = r
        warps_per_sm = min(64, 65536 // (32 * r['registers']) // warps * warps)
        print(f"{label:20s} sm_{args.arch}: {r['registers']:3d} registers, {r['spill_bytes']} bytes spilled, "
              f"{warps} warps per program, up to {warps_per_sm} warps per SM", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == '__main__':
    main()
