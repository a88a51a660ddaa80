"""What every data-preparation tool shares: output-folder safety (no silent overwrite), a process pool with a
progress bar, common arguments, and the one-line error exit of :mod:`.common`. Image listing and I/O come
from :mod:`basicsr_mambair.image_io`."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import ToolError
from ..image_io import write_image
from .common import EXIT_NOTHING_RAN, EXIT_OK, error, run_command


def require_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype != np.uint8:
        raise ToolError(f'{path}: only 8-bit images are supported, got {img.dtype}')
    return img


def write_png(path: Path, img: np.ndarray, compression: int = 3) -> None:
    """Lossless PNG, written atomically (``compression`` 0-9 trades size for speed, not quality)."""
    write_image(path, img, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Create ``path``; refuse a non-empty existing folder unless ``overwrite`` (then files in it are replaced)."""
    if path.exists() and not path.is_dir():
        raise ToolError(f'output {path} exists and is not a folder')
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ToolError(f'output folder {path} exists and is not empty (use --overwrite to write into it)')
    path.mkdir(parents=True, exist_ok=True)


def remove_output(path: Path, overwrite: bool) -> None:
    """For outputs that cannot be written into (an LMDB): refuse one that exists unless ``overwrite``; delete it."""
    if not path.exists():
        return
    if not overwrite:
        raise ToolError(f'output {path} already exists (use --overwrite to replace it)')
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def parallel_map(func: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str,
                 unit: str = 'image') -> Iterable[Any]:
    """``func`` over ``items`` in ``workers`` processes (in order), with a tqdm progress bar.

    The first error in any worker stops the pool and is raised here.
    """
    bar = tqdm(total=len(items), unit=unit, desc=desc, dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield func(item)
                bar.update()
        else:
            with Pool(min(workers, len(items))) as pool:
                for result in pool.imap(func, items, chunksize=1):
                    yield result
                    bar.update()
    finally:
        bar.close()


def describe(doc: str) -> str:
    """A module docstring as ``--help`` text (reST literals shown plainly)."""
    return doc.strip().replace('``', '')


def tool_parser(prog: str, doc: str, examples: Sequence[str], heading: str = 'examples') -> argparse.ArgumentParser:
    """A tool's parser: ``doc`` (its module docstring) as the description, ``examples`` (command lines after
    the program name) in the epilog."""
    epilog = f'{heading}:\n' + ''.join(f'  {prog} {example}\n' for example in examples)
    return argparse.ArgumentParser(prog=prog, description=describe(doc), epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_arguments(parser: argparse.ArgumentParser,
                         overwrite_help: str = 'write into existing non-empty output folders (same-named files '
                         'are replaced)') -> None:
    """``-j/--workers`` and ``--overwrite``."""
    parser.add_argument('-j', '--workers', type=int, default=os.cpu_count() or 1, metavar='N',
                        help='worker processes (default: all %(default)s cores)')
    parser.add_argument('--overwrite', action='store_true', help=overwrite_help)


def run_tool(prog: str, work: Callable[[argparse.Namespace], str], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``work(args)`` and print its summary line; user errors become one line (exit 2)."""
    args = parser.parse_args(argv)
    if getattr(args, 'workers', 1) < 1:
        parser.error('--workers must be at least 1')
    # OpenCV logs its own decoder complaints to stderr; our error line names the file instead
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    def body() -> int:
        try:
            summary = work(args)
        except OSError as e:  # reading or writing a file (full disk, permissions): one line, nothing more
            error(prog, f'{e.strerror or e}' + (f': {e.filename}' if e.filename else ''))
            return EXIT_NOTHING_RAN
        print(summary)
        return EXIT_OK

    try:
        return run_command(prog, body)
    finally:
        cv2.utils.logging.setLogLevel(previous)
