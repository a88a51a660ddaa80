"""``mambair-make-jpeg``: JPEG-compressed copies of a set of images, in the official CAR layout.

Writes ``OUTPUT/LQ/<q>/<name>.jpg`` for every ``--quality`` (default 10, 30 and 40, the official
test qualities) and ``OUTPUT/HQ/<name>.png``, the lossless clean image the JPEGs were encoded
from. Images are read as grayscale with OpenCV (``IMREAD_GRAYSCALE``, what the CAR datasets do)
unless ``--color``. Encoding is OpenCV's at the given quality (baseline, 4:2:0 chroma for colour),
the same function ``JPEGArtifactDataset`` uses on the fly, so both give identical inputs.
How the official MambaIR JPEGs were made is not published; SwinIR's evaluation encodes the same
way with OpenCV.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import cv2

from ..data.util import encode_jpeg
from ..errors import ToolError
from ..image_io import decodes_to_shape, list_images, read_image
from ..utils.files import atomic_write_bytes
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

PROG = 'mambair-make-jpeg'
OFFICIAL_QUALITIES = (10, 30, 40)


def make_one(path: Path, outputs: Sequence[Path], qualities: Sequence[int], gray: bool, write_hq: bool) -> None:
    """Write the JPEGs of one image into ``outputs`` (one folder per quality, then the folder of the clean PNGs
    when ``write_hq``)."""
    img = require_uint8(read_image(path, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR), path)
    for folder, quality in zip(outputs, qualities):
        data = encode_jpeg(img, quality)
        atomic_write_bytes(folder / f'{path.stem}.jpg', data, verify=decodes_to_shape(img.shape))
    if write_hq:
        write_png(outputs[-1] / f'{path.stem}.png', img)


def make_jpeg(input_dir: Path, output_dir: Path, qualities: Sequence[int] = OFFICIAL_QUALITIES, gray: bool = True,
              write_hq: bool = True, workers: int = 1, overwrite: bool = False) -> int:
    """Write ``output_dir/LQ/<q>/`` (and ``HQ/``); returns the number of images."""
    qualities = list(dict.fromkeys(qualities))
    if not all(1 <= q <= 100 for q in qualities):
        raise ToolError(f'JPEG qualities must be in 1..100, got {qualities}')
    paths = list_images(input_dir, 'input folder')
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise ToolError(f'two input images share the name {dup} (different extensions)')
    folders = [output_dir / 'LQ' / str(q) for q in qualities] + ([output_dir / 'HQ'] if write_hq else [])
    check_not_input(folders, [input_dir, *paths])
    outputs = [StagedOutput(f, overwrite, r'.+\.jpg') for f in folders[:len(qualities)]]
    outputs += [StagedOutput(f, overwrite, r'.+\.png') for f in folders[len(qualities):]]
    with staged_outputs(outputs) as staged:
        work = partial(make_one, outputs=staged, qualities=qualities, gray=gray, write_hq=write_hq)
        for _ in parallel_map(work, paths, workers, desc='JPEG'):
            pass
    return len(paths)


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__, ['downloads/classic5 datasets/JPEG_CAR/Classic5',
                                         'datasets/DFWB/HQ_color datasets/DFWB_CAR --quality 10 30 40'])
    parser.add_argument('input', type=Path, help='folder of clean images')
    parser.add_argument('output', type=Path, help='folder that receives HQ/ and LQ/<quality>/')
    parser.add_argument('-q', '--quality', type=int, nargs='+', default=list(OFFICIAL_QUALITIES),
                        help='JPEG qualities 1-100 (default: 10 30 40)')
    parser.add_argument('--color', dest='gray', action='store_false',
                        help='keep colour (default: grayscale, as the official CAR models)')
    parser.add_argument('--no-hq', dest='write_hq', action='store_false',
                        help='do not write the clean PNGs to OUTPUT/HQ')
    add_common_arguments(parser)
    return parser


def _work(args: argparse.Namespace) -> str:
    n = make_jpeg(args.input, args.output, args.quality, args.gray, args.write_hq, args.workers, args.overwrite)
    qs = '/'.join(str(q) for q in dict.fromkeys(args.quality))
    return f'wrote {n} {"grayscale" if args.gray else "colour"} images at JPEG quality {qs} to {args.output}'


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-make-jpeg``."""
    return run_tool(PROG, _work, build_parser(), argv)


if __name__ == '__main__':
    sys.exit(main())
