"""``mambair-extract-subimages``: cut large training images into overlapping sub-images for faster I/O.

BasicSR's DIV2K recipe (``scripts/data_preparation/extract_subimages.py``, not shipped in the
pip package): windows of ``crop_size`` (480) moved by ``step`` (240); when the last window of a
row or column leaves more than ``thresh_size`` (0) pixels uncovered, one more window flush with
the border is added. Sub-image ``k`` (row-major, from 1) of ``0001.png`` is ``0001_s{k:03d}.png``.

For LR images pass ``--scale s``: crop size, step and threshold are divided by ``s`` and a
trailing ``x{s}`` is dropped from the name (``0001x2.png`` -> ``0001_s001.png``), so LR and HR
sub-images pair up with ``filename_tmpl: '{}'``. Output is always PNG (lossless; re-encoding
crops of a JPEG as JPEG would add a second compression).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from ..errors import ToolError
from ..image_io import list_images, read_image
from .data_tool import (
    StagedOutput,
    add_common_arguments,
    check_not_input,
    parallel_map,
    run_tool,
    staged_outputs,
    tool_parser,
    write_png,
)

PROG = 'mambair-extract-subimages'
SUBIMAGE_NAMES = r'.+_s[0-9]{3,}\.png'  # what --overwrite may replace (and remove when stale)


def window_starts(length: int, crop: int, step: int, thresh: int) -> list[int]:
    """Start offsets of the windows along one axis (empty when ``length < crop``), BasicSR's rule."""
    if length < crop:
        return []
    starts = list(range(0, length - crop + 1, step))
    if length - (starts[-1] + crop) > thresh:
        starts.append(length - crop)
    return starts


def subimage_stem(stem: str, scale: int) -> str:
    """The name shared by HR and LR sub-images: a trailing ``x{scale}`` of LR files is dropped."""
    suffix = f'x{scale}'
    return stem[:-len(suffix)] if scale > 1 and stem.endswith(suffix) and len(stem) > len(suffix) else stem


def extract_one(path: Path, out_dir: Path, crop: int, step: int, thresh: int, scale: int,
                compression: int) -> int:
    """Write the sub-images of one image; returns how many (0 if it is smaller than ``crop``)."""
    img = read_image(path, cv2.IMREAD_UNCHANGED)
    h, w = img.shape[:2]
    stem = subimage_stem(path.stem, scale)
    index = 0
    for top in window_starts(h, crop, step, thresh):
        for left in window_starts(w, crop, step, thresh):
            index += 1
            patch = np.ascontiguousarray(img[top:top + crop, left:left + crop])
            write_png(out_dir / f'{stem}_s{index:03d}.png', patch, compression)
    return index


def extract_subimages(input_dir: Path, output_dir: Path, crop_size: int = 480, step: int = 240,
                      thresh_size: int = 0, scale: int = 1, compression: int = 3, workers: int = 1,
                      overwrite: bool = False) -> tuple[int, int, int]:
    """Extract sub-images of every image in ``input_dir``; sizes in HR pixels (divided by ``scale``).

    Returns:
        (images read, sub-images written, images skipped because they are smaller than the crop).
    """
    for name, value in (('crop size', crop_size), ('step', step), ('threshold', thresh_size)):
        if value % scale:
            raise ToolError(f'{name} {value} is not divisible by --scale {scale}')
    crop, stride, thresh = crop_size // scale, step // scale, thresh_size // scale
    if crop < 1 or stride < 1 or thresh < 0:
        raise ToolError('crop size and step must be positive, the threshold not negative')
    if not 0 <= compression <= 9:
        raise ToolError(f'--compression-level must be in 0..9, got {compression}')
    paths = list_images(input_dir, 'input folder')
    stems = [subimage_stem(p.stem, scale) for p in paths]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise ToolError(f'two input images would both write {dup}_s*.png (same name, different extension?)')
    check_not_input([output_dir], [input_dir, *paths])
    with staged_outputs([StagedOutput(output_dir, overwrite, SUBIMAGE_NAMES, remove_stale=True)]) as (staged,):
        work = partial(extract_one, out_dir=staged, crop=crop, step=stride, thresh=thresh, scale=scale,
                       compression=compression)
        counts = list(parallel_map(work, paths, workers, desc='Extract'))
    return len(paths), sum(counts), counts.count(0)


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__, ['datasets/DIV2K/HR datasets/DIV2K/HR_sub',
                                         'datasets/DIV2K/LR_bicubic/X2 datasets/DIV2K/LR_bicubic/X2_sub --scale 2'],
                         heading='examples (BasicSR DIV2K recipe)')
    parser.add_argument('input', type=Path, help='folder of images')
    parser.add_argument('output', type=Path, help='folder for the sub-images (created)')
    parser.add_argument('--crop-size', type=int, default=480, help='sub-image side in HR pixels (default 480)')
    parser.add_argument('--step', type=int, default=240, help='window step in HR pixels (default 240)')
    parser.add_argument('--thresh-size', type=int, default=0,
                        help='add a border-flush window when more than this many HR pixels remain (default 0)')
    parser.add_argument('--scale', type=int, default=1,
                        help='the input is LR at this factor: sizes are divided by it, a trailing x<scale> is '
                        'removed from names (default 1)')
    parser.add_argument('--compression-level', type=int, default=3, help='PNG compression 0-9 (default 3)')
    add_common_arguments(parser)
    return parser


def _work(args: argparse.Namespace) -> str:
    if args.scale < 1:
        raise ToolError(f'--scale must be at least 1, got {args.scale}')
    n_img, n_sub, skipped = extract_subimages(args.input, args.output, args.crop_size, args.step, args.thresh_size,
                                              args.scale, args.compression_level, args.workers, args.overwrite)
    note = f' ({skipped} smaller than the crop were skipped)' if skipped else ''
    return f'wrote {n_sub} sub-images of {n_img} images to {args.output}{note}'


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-extract-subimages``."""
    return run_tool(PROG, _work, build_parser(), argv)


if __name__ == '__main__':
    sys.exit(main())
