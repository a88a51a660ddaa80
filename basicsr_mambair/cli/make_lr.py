"""``mambair-make-lr``: bicubic LR images exactly as MATLAB's ``imresize(img, 1/s)`` makes them from uint8.

The benchmark LR files (DIV2K, and Set5/Set14/... as used by EDSR/SwinIR/MambaIR) come from MATLAB:
the HR image is mod-cropped to a multiple of ``s``, then ``imresize(uint8_img, 1/s, 'bicubic')``
resizes the rows first and the columns second (equal factors keep MATLAB's dimension order)
with the antialiased cubic kernel (a = -0.5, width 4s), mirror-extended borders, double-precision
sums, and -- because the input is uint8 -- a conversion back to uint8 (round half away from zero,
saturating) after **each** 1-D pass. BasicSR's ``imresize`` works in float with no rounding in
between and differs from those files on ~14% of the pixels (by up to 2 levels). Here BasicSR's
``calculate_weights_indices`` supplies the kernel weights (evaluated in float64, as MATLAB does)
and this module adds what it lacks: MATLAB's mirrored indices and the uint8 rounding per pass.
``--double`` skips the intermediate rounding (MATLAB on ``im2double`` input, rounded once).

Output: ``OUTPUT/X{s}/{stem}x{s}.png`` for every ``--scale`` (``--no-suffix``: ``{stem}.png``);
``--hr-out`` also writes the mod-cropped HR images that pair with them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import cv2

from ..errors import ToolError
from ..image_io import list_images, read_image
from ..utils.matlab_resize import imresize_matlab
from .data_tool import (
    StagedOutput,
    add_common_arguments,
    check_not_input,
    parallel_map,
    require_uint8,
    run_tool,
    staged_outputs,
    tool_parser,
    write_png,
)

PROG = 'mambair-make-lr'


def lr_file_name(stem: str, scale: int, suffix: bool) -> str:
    return f'{stem}x{scale}.png' if suffix else f'{stem}.png'


def make_one(path: Path, outputs: Sequence[Path], scales: Sequence[int], suffix: bool, per_pass_uint8: bool,
             hr_out: Path | None) -> None:
    """Write the LR versions of one image into ``outputs`` (one folder per scale), its mod-cropped HR into
    ``hr_out``."""
    from basicsr.data.transforms import mod_crop

    img = require_uint8(read_image(path, cv2.IMREAD_UNCHANGED), path)
    for scale in scales:
        try:
            lr = imresize_matlab(img, scale, per_pass_uint8)
        except ValueError as e:
            raise ToolError(f'{path}: {e}') from None
        write_png(outputs[scales.index(scale)] / lr_file_name(path.stem, scale, suffix), lr)
    if hr_out is not None:
        write_png(hr_out / f'{path.stem}.png', mod_crop(img, scales[0]))


def make_lr(input_dir: Path, output_dir: Path, scales: Sequence[int], suffix: bool = True,
            per_pass_uint8: bool = True, hr_out: Path | None = None, workers: int = 1,
            overwrite: bool = False) -> int:
    """Write ``output_dir/X{s}/`` for every scale; returns the number of input images."""
    scales = list(dict.fromkeys(scales))
    if any(s < 2 for s in scales):
        raise ToolError(f'scales must be integers >= 2, got {scales}')
    if hr_out is not None and len(scales) != 1:
        raise ToolError('--hr-out needs exactly one --scale (the mod-crop depends on the scale)')
    paths = list_images(input_dir, 'input folder')
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise ToolError(f'two input images share the name {dup} (different extensions)')
    lr_dirs = [output_dir / f'X{s}' for s in scales]
    check_not_input([*lr_dirs, *([hr_out] if hr_out is not None else [])], [input_dir, *paths])
    outputs = [StagedOutput(folder, overwrite, rf'.+x{s}\.png' if suffix else r'.+\.png')
               for folder, s in zip(lr_dirs, scales)]
    if hr_out is not None:
        outputs.append(StagedOutput(hr_out, overwrite, r'.+\.png'))
    with staged_outputs(outputs) as staged:
        work = partial(make_one, outputs=staged[:len(scales)], scales=scales, suffix=suffix,
                       per_pass_uint8=per_pass_uint8, hr_out=staged[-1] if hr_out is not None else None)
        for _ in parallel_map(work, paths, workers, desc='Bicubic LR'):
            pass
    return len(paths)


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__, [
        'datasets/DF2K/HR datasets/DF2K/LR_bicubic --scale 2 3 4',
        'datasets/SR/Set5/original datasets/SR/Set5/LR_bicubic --scale 4 --hr-out datasets/SR/Set5/HR'])
    parser.add_argument('input', type=Path, help='folder of HR images (8-bit)')
    parser.add_argument('output', type=Path, help='folder that receives X<s>/ sub-folders')
    parser.add_argument('-s', '--scale', type=int, nargs='+', required=True, help='downscaling factor(s), e.g. 2 3 4')
    parser.add_argument('--no-suffix', dest='suffix', action='store_false',
                        help="name LR files like their HR file (default: '<name>x<s>.png', filename_tmpl '{}x<s>')")
    parser.add_argument('--double', dest='per_pass_uint8', action='store_false',
                        help='no uint8 rounding between the two passes (MATLAB on im2double input)')
    parser.add_argument('--hr-out', type=Path, default=None, metavar='DIR',
                        help='also write the HR images mod-cropped to the (single) scale, as PNG')
    add_common_arguments(parser)
    return parser


def _work(args: argparse.Namespace) -> str:
    n = make_lr(args.input, args.output, args.scale, args.suffix, args.per_pass_uint8, args.hr_out, args.workers,
                args.overwrite)
    where = ', '.join(str(args.output / f'X{s}') for s in dict.fromkeys(args.scale))
    return f'wrote the bicubic LR of {n} images to {where}'


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-make-lr``."""
    return run_tool(PROG, _work, build_parser(), argv)


if __name__ == '__main__':
    sys.exit(main())
