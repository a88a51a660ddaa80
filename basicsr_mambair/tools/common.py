"""What every data-preparation tool shares: image listing and I/O with clear errors, output-folder
safety (no silent overwrite), a process pool with a progress bar, and a one-line error exit."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..data.util import is_image_file


class ToolError(Exception):
    """A problem with the input or output that the user must fix (printed as one line)."""


def list_images(folder: Path) -> list[Path]:
    """Sorted image files directly inside ``folder`` (other files, e.g. a README, are ignored)."""
    if not folder.is_dir():
        raise ToolError(f'input folder not found: {folder}')
    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))
    if not paths:
        raise ToolError(f'no images in {folder}')
    return paths


def read_image(path: Path, flag: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """``cv2.imread`` (any path, also non-ASCII) that raises a clear error for an unreadable file."""
    try:
        content = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ToolError(f'cannot read {path}: {e.strerror}') from None
    img = cv2.imdecode(content, flag) if content.size else None
    if img is None:
        raise ToolError(f'cannot decode image {path} (corrupt or not an image)')
    return img


def require_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype != np.uint8:
        raise ToolError(f'{path}: only 8-bit images are supported, got {img.dtype}')
    return img


def write_bytes(path: Path, content: bytes) -> None:
    try:
        path.write_bytes(content)
    except OSError as e:
        raise ToolError(f'cannot write {path}: {e.strerror}') from None


def write_png(path: Path, img: np.ndarray, compression: int = 3) -> None:
    """Lossless PNG (``compression`` 0-9 trades size for speed, not quality)."""
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise ToolError(f'OpenCV could not PNG-encode {path.name} (shape {img.shape}, {img.dtype})')
    write_bytes(path, buf.tobytes())


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


def add_common_arguments(parser: argparse.ArgumentParser,
                         overwrite_help: str = 'write into existing non-empty output folders (same-named files '
                         'are replaced)') -> None:
    """``-j/--workers`` and ``--overwrite``."""
    parser.add_argument('-j', '--workers', type=int, default=os.cpu_count() or 1, metavar='N',
                        help='worker processes (default: all %(default)s cores)')
    parser.add_argument('--overwrite', action='store_true', help=overwrite_help)


def run_tool(prog: str, work: Callable[[argparse.Namespace], str], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``work(args)`` and print its summary line; user errors become one line, exit 2."""
    args = parser.parse_args(argv)
    if getattr(args, 'workers', 1) < 1:
        parser.error('--workers must be at least 1')
    # OpenCV logs its own decoder complaints to stderr; our error line names the file instead
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        summary = work(args)
    except ToolError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    finally:
        cv2.utils.logging.setLogLevel(previous)
    print(summary)
    return 0
