"""What every data-preparation tool shares: output-folder safety (outputs built beside their place and swapped
in when complete, ``--overwrite`` replacing only the tool's own files, outputs never inside the inputs), a
process pool with a progress bar, common arguments, and the one-line error exit of :mod:`.common`. Image
listing and I/O come from :mod:`basicsr_mambair.image_io`."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import ToolError
from ..image_io import write_image
from ..utils.files import missing_folders, remove_empty
from .common import EXIT_NOTHING_RAN, EXIT_OK, error, run_command


def require_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype != np.uint8:
        raise ToolError(f'{path}: only 8-bit images are supported, got {img.dtype}')
    return img


def write_png(path: Path, img: np.ndarray, compression: int = 3) -> None:
    """Lossless PNG, written atomically (``compression`` 0-9 trades size for speed, not quality)."""
    write_image(path, img, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])


def check_not_input(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuse (one line) an output that is an input, or a folder holding an input: ``--overwrite`` must never
    be able to replace or delete what the tool reads."""
    resolved = [(p, p.resolve()) for p in inputs]
    for out in outputs:
        target = out.resolve()
        for given, source in resolved:
            if source == target or source.is_relative_to(target):
                what = 'is' if source == target else 'contains'
                raise ToolError(f'the output {out} {what} the input {given}: choose an output folder outside the '
                                'inputs (nothing was written)')


class StagedOutput:
    """An output folder built in a hidden sibling and put in place only when complete (:meth:`commit`).

    ``--overwrite`` then replaces only what this tool writes: names matching ``pattern`` (the tool's own naming,
    e.g. ``<name>_s001.png``); files the tool did not write are kept. With ``remove_stale`` such files that
    this run did not write again are removed (stale sub-images or patches of a different input set). Nothing
    of the old folder is touched before the new result exists; a failed run leaves the old folder as it was.

    Args:
        final: where the result goes.
        overwrite: the user's ``--overwrite`` (else an existing non-empty ``final`` is refused).
        pattern: regular expression (full match) of the file names this tool writes into ``final``.
        remove_stale: remove files matching ``pattern`` that this run did not write.
        create: create the staging folder (False for writers that insist on creating it, e.g. LMDB).
    """

    def __init__(self, final: Path, overwrite: bool, pattern: str, remove_stale: bool = False,
                 create: bool = True) -> None:
        if final.exists() and not final.is_dir():
            raise ToolError(f'output {final} exists and is not a folder')
        if final.is_dir() and any(final.iterdir()) and not overwrite:
            raise ToolError(f'output folder {final} exists and is not empty (use --overwrite to replace what '
                            'this tool wrote there)')
        self.final, self.pattern, self.remove_stale, self.create = final, re.compile(pattern), remove_stale, create
        # same parent: same file system, so the final renames are atomic; the name keeps the suffix (.lmdb)
        self.path = final.parent / f'.partial{os.getpid()}.{final.name}'

    def open(self) -> Path:
        """Make the (empty) staging folder's place; returns it."""
        self.made = missing_folders(self.final.parent)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # left by an earlier process of the same id: our own staging folder
            shutil.rmtree(self.path)
        if self.create:
            self.path.mkdir()
        return self.path

    def _ours(self, entry: Path) -> bool:
        return entry.is_file() and not entry.is_symlink() and self.pattern.fullmatch(entry.name) is not None

    def commit(self) -> None:
        """Put the staged result in place: a rename when ``final`` is absent or holds only files of ours (the old
        folder is removed after the swap), else file by file (each an atomic replace), other files kept."""
        final = self.final
        old = list(final.iterdir()) if final.is_dir() else []
        new = {entry.name for entry in self.path.iterdir()}
        linked = final.is_symlink()  # the link stays; its folder gets the files
        if not old and not linked:
            if final.is_dir():
                final.rmdir()
            os.rename(self.path, final)
        elif not linked and all(self._ours(e) for e in old) and (self.remove_stale or {e.name for e in old} <= new):
            aside = final.parent / f'.replaced{os.getpid()}.{final.name}'
            os.rename(final, aside)
            os.rename(self.path, final)
            shutil.rmtree(aside)
        else:
            final.mkdir(exist_ok=True)
            for name in sorted(new):
                os.replace(self.path / name, final / name)
            if self.remove_stale:
                for entry in old:
                    if entry.name not in new and self._ours(entry):
                        entry.unlink()
            self.path.rmdir()

    def discard(self) -> None:
        """Remove the staging folder, and the parents :meth:`open` made if they are empty."""
        shutil.rmtree(self.path, ignore_errors=True)
        remove_empty(getattr(self, 'made', []))


@contextlib.contextmanager
def staged_outputs(outputs: Sequence[StagedOutput]) -> Iterator[list[Path]]:
    """Yield the staging folders to write into; commit them all when the block succeeds, else discard them."""
    try:
        yield [out.open() for out in outputs]
    except BaseException:
        for out in reversed(outputs):  # the last made parents first: a shared parent is empty only then
            out.discard()
        raise
    for out in outputs:
        out.commit()


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
                         overwrite_help: str = 'write into existing non-empty output folders: files this tool '
                         'writes are replaced once the new ones are complete, other files are kept') -> None:
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
