"""``mambair-make-meta-info``: list HR training images in a meta-info file for BasicSR's RealESRGANDataset.

Real-world SR training (``options/train/train_MambaIR_RealESR{Net,GAN}_x4.yml``) reads the images listed in
``meta_info``, one path per line relative to the dataset's ``dataroot_gt`` (Real-ESRGAN's format, e.g.
``DF2K_HR_sub/000001_s001.png``). This writes that file for the images directly inside one or more
folders (in the order given, each sorted by name; files that are not images are ignored), with paths
relative to ``--root`` (default: the folders' common parent folder, or the folder itself when there is
one): use that root as ``dataroot_gt``. Each image is decoded first (``--no-check`` skips that), so that a
broken file stops here, with its name, rather than days into a training run. The file is written atomically;
an existing one is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ToolError
from ..image_io import list_images, read_image
from ..utils.files import atomic_write_bytes
from .data_tool import add_common_arguments, parallel_map, run_tool, tool_parser

PROG = 'mambair-make-meta-info'


def default_root(folders: Sequence[Path]) -> Path:
    """The folder the listed paths are relative to: the folders' common parent (one folder: itself)."""
    if len(folders) == 1:
        return folders[0]
    common = os.path.commonpath([os.path.abspath(f) for f in folders])
    try:
        return Path(os.path.relpath(common))
    except ValueError:  # another drive than the working directory (Windows)
        return Path(common)


def meta_info_lines(folders: Sequence[Path], root: Path) -> list[tuple[str, Path]]:
    """(line, image path) of every image directly inside ``folders``; lines are POSIX paths relative to ``root``.

    Raises :class:`ToolError` for an image outside ``root``, a path BasicSR cannot read back (it splits each line
    at spaces) or a path listed twice.
    """
    root_abs = Path(os.path.abspath(root))  # not resolve(): folders linked into the root stay inside it
    entries: list[tuple[str, Path]] = []
    for folder in folders:
        for path in list_images(folder, 'input folder'):
            try:
                relative = Path(os.path.abspath(path)).relative_to(root_abs)
            except ValueError:
                raise ToolError(f'{path} is not inside --root {root}') from None
            line = relative.as_posix()
            if any(c.isspace() for c in line):
                raise ToolError(f'{line}: BasicSR splits meta-info lines at white space; rename the file or folder')
            entries.append((line, path))
    lines = [line for line, _ in entries]
    if len(set(lines)) != len(lines):
        raise ToolError(f'{next(x for x in lines if lines.count(x) > 1)} is listed twice (a folder given twice?)')
    return entries


def _decode(path: Path) -> None:
    read_image(path)  # raises ImageError naming the file


def make_meta_info(folders: Sequence[Path], output: Path, root: Path | None = None, check: bool = True,
                   workers: int = 1, overwrite: bool = False) -> tuple[int, Path]:
    """Write the meta-info file ``output`` for the images of ``folders``; returns (images listed, root)."""
    root = root if root is not None else default_root(folders)
    if not root.is_dir():
        raise ToolError(f'--root {root} is not a folder')
    if output.exists() and not overwrite:
        raise ToolError(f'{output} already exists (use --overwrite to replace it)')
    entries = meta_info_lines(folders, root)
    if check:
        for _ in parallel_map(_decode, [path for _, path in entries], workers, desc='Check'):
            pass
    atomic_write_bytes(output, ''.join(f'{line}\n' for line, _ in entries).encode())
    return len(entries), root


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__, [
        'datasets/DF2K_OST/DF2K_HR_sub datasets/DF2K_OST/OST_sub -o datasets/DF2K_OST/meta_info.txt',
        'my_photos/ -o my_photos/meta_info.txt   # dataroot_gt: my_photos'])
    parser.add_argument('folders', type=Path, nargs='+', help='folders of HR images (their images, not sub-folders)')
    parser.add_argument('-o', '--output', type=Path, required=True, help='the meta-info file to write')
    parser.add_argument('--root', type=Path, default=None,
                        help="the dataset's dataroot_gt, which the listed paths are relative to (default: the "
                        "folders' common parent, or the one folder given)")
    parser.add_argument('--no-check', dest='check', action='store_false',
                        help='list the files without decoding each image first')
    add_common_arguments(parser, overwrite_help='replace an existing meta-info file')
    return parser


def _work(args: argparse.Namespace) -> str:
    n, root = make_meta_info(args.folders, args.output, args.root, args.check, args.workers, args.overwrite)
    return f'wrote {n} image paths to {args.output} (relative to {root}: use it as dataroot_gt)'


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-make-meta-info``."""
    return run_tool(PROG, _work, build_parser(), argv)


if __name__ == '__main__':
    sys.exit(main())
