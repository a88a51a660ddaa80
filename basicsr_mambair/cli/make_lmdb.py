"""``mambair-make-lmdb``: pack a folder of images into a BasicSR LMDB (``io_backend: {type: lmdb}``).

The result is what BasicSR's ``create_lmdb.py`` makes: ``OUTPUT.lmdb/{data.mdb, lock.mdb,
meta_info.txt}``, every image stored losslessly as PNG (``cv2.imencode``, ``--compress-level``),
the key being the file name without extension, and one ``<key>.png (h,w,c) <level>`` line per
image in ``meta_info.txt``. GT and LQ LMDBs of a pair must have the same keys: for LR files named
``0001x2.png`` pass ``--strip-suffix x2`` (sub-images from ``mambair-extract-subimages --scale``
already share their HR names). Images are read and encoded in ``--workers`` processes and
written by BasicSR's ``LmdbMaker``; unlike BasicSR's ``make_lmdb_from_imgs`` (which reads with
no error check and sizes the map from the first image) an unreadable image stops with its name.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import cv2
import lmdb

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
)

PROG = 'mambair-make-lmdb'
LMDB_FILES = r'data\.mdb|lock\.mdb|meta_info\.txt'  # what --overwrite replaces in an existing LMDB folder


def lmdb_key(stem: str, strip_suffix: str) -> str:
    """The key of an image: its stem, minus ``strip_suffix`` at the end."""
    if strip_suffix and stem.endswith(strip_suffix) and len(stem) > len(strip_suffix):
        return stem[:-len(strip_suffix)]
    return stem


def check_key(key: str, path: Path) -> None:
    # BasicSR reads keys back from meta_info.txt with `line.split('.')[0]` and encodes them as ASCII
    if not key.isascii() or '.' in key or any(c.isspace() for c in key):
        raise ToolError(f'{path.name}: an LMDB key must be ASCII without dots or spaces, got {key!r}')


def encode_one(path: Path, compress_level: int) -> tuple[bytes, tuple[int, int, int]]:
    """PNG bytes and (h, w, c) of one image."""
    img = read_image(path, cv2.IMREAD_UNCHANGED)
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise ToolError(f'OpenCV could not PNG-encode {path}')
    h, w = img.shape[:2]
    return buf.tobytes(), (h, w, 1 if img.ndim == 2 else img.shape[2])


def make_lmdb(input_dir: Path, lmdb_path: Path, strip_suffix: str = '', compress_level: int = 1, batch: int = 5000,
              workers: int = 1, overwrite: bool = False) -> int:
    """Pack every image of ``input_dir`` into ``lmdb_path`` (must end in ``.lmdb``); returns the image count."""
    from basicsr.utils.lmdb_util import LmdbMaker

    if lmdb_path.suffix != '.lmdb':
        raise ToolError(f"the output must end in '.lmdb' (BasicSR's convention), got {lmdb_path}")
    if not 0 <= compress_level <= 9:
        raise ToolError(f'--compress-level must be in 0..9, got {compress_level}')
    if batch < 1:
        raise ToolError(f'--batch must be positive, got {batch}')
    paths = list_images(input_dir, 'input folder')
    keys = [lmdb_key(p.stem, strip_suffix) for p in paths]
    for key, path in zip(keys, paths):
        check_key(key, path)
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ToolError(f'two images have the key {dup}')
    check_not_input([lmdb_path], [input_dir, *paths])
    # The map size only reserves address space; a generous bound of the raw pixel bytes is safe.
    raw = sum(p.stat().st_size for p in paths)
    map_size = max(1 << 26, 64 * raw)
    with staged_outputs([StagedOutput(lmdb_path, overwrite, LMDB_FILES, create=False)]) as (staged,):
        maker = LmdbMaker(str(staged), map_size=map_size, batch=batch, compress_level=compress_level)
        try:
            work = partial(encode_one, compress_level=compress_level)
            for key, (content, shape) in zip(keys, parallel_map(work, paths, workers, desc='LMDB')):
                maker.put(content, key, shape)
            maker.close()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                maker.close()
            if isinstance(exc, lmdb.Error):  # e.g. a full disk at a commit
                raise OSError(errno.EIO, f'cannot write the LMDB: {exc}', str(lmdb_path)) from None
            raise
        check_lmdb(staged, keys, lmdb_path)
    return len(paths)


def check_lmdb(path: Path, keys: Sequence[str], name: Path) -> None:
    """The written LMDB holds every key with a non-empty value and a meta_info line per key (else ``OSError``)."""
    meta = (path / 'meta_info.txt').read_text().splitlines()
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            missing = [k for k in keys if not txn.get(k.encode('ascii'))]
    finally:
        env.close()
    if missing or len(meta) != len(keys):
        raise OSError(errno.EIO, f'the written LMDB is incomplete ({len(missing)} images missing, {len(meta)} '
                      f'meta_info lines for {len(keys)} images)', str(name))


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__, [
        'datasets/DF2K/HR_sub datasets/DF2K/HR_sub.lmdb',
        'datasets/DF2K/LR_bicubic/X2_sub datasets/DF2K/LR_bicubic_X2_sub.lmdb',
        'datasets/SR/Set5/LR_bicubic/X2 datasets/SR/Set5/LR_X2.lmdb --strip-suffix x2'])
    parser.add_argument('input', type=Path, help='folder of images')
    parser.add_argument('output', type=Path, help='the LMDB folder to create, ending in .lmdb')
    parser.add_argument('--strip-suffix', default='', metavar='SUFFIX',
                        help="remove this ending from file names to form keys, e.g. 'x2' for LR files")
    parser.add_argument('--compress-level', type=int, default=1, help='PNG compression 0-9 (default 1, as BasicSR)')
    parser.add_argument('--batch', type=int, default=5000, help='images per LMDB transaction (default 5000)')
    add_common_arguments(parser, overwrite_help='replace an existing LMDB of that name once the new one is complete '
                         '(other files in its folder are kept)')
    return parser


def _work(args: argparse.Namespace) -> str:
    n = make_lmdb(args.input, args.output, args.strip_suffix, args.compress_level, args.batch, args.workers,
                  args.overwrite)
    return f'wrote {n} images to {args.output} (keys and shapes in {args.output / "meta_info.txt"})'


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-make-lmdb``."""
    return run_tool(PROG, _work, build_parser(), argv)


if __name__ == '__main__':
    sys.exit(main())
