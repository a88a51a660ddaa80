"""Atomic, verified file writes: a result appears under its final name complete and checked, or not at all.

A run killed or failing while writing (full disk, I/O error) leaves the previous file (or none), never a
truncated one that a rerun would take for finished work. Errors are ``OSError`` naming the final path.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

Verify = Callable[[Path], None]


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:  # must not hide the error that brought us here
        pass


class Exists(FileExistsError):
    """``path`` exists and was not to be replaced (``str`` is the one-line message ``<path> exists``)."""

    def __str__(self) -> str:
        return f'{self.filename} exists'


def _no_replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless something is there by then: a hard link fails rather than replaces
    (where the file system has none, a check just before an ordinary rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise Exists(errno.EEXIST, 'exists', str(path)) from None
    except OSError:  # no hard links here (some network/FAT file systems)
        if os.path.lexists(path):
            raise Exists(errno.EEXIST, 'exists', str(path)) from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, verify: Verify | None = None, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is fsynced, checked by ``verify(tmp)``
    (which raises ``OSError`` for a bad file) and renamed to ``path``.

    On any exception the temporary file is removed and ``path`` is untouched; an ``OSError`` without a file
    name (e.g. ``ENOSPC`` from ``write``) gets ``path`` as its ``filename``. The temporary name starts with a
    dot and ends with ``.tmp<pid>``, so concurrent writers never clash and listings skip it. Without
    ``overwrite`` an existing ``path`` is never replaced: :class:`Exists` (a FileExistsError), also when the
    file appears while writing.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise Exists(errno.EEXIST, 'exists', str(path))
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _no_replace(tmp, path)
        _fsync_dir(path.parent)
    except Exists:
        raise
    except OSError as exc:
        if exc.filename is None or Path(exc.filename) == tmp:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    finally:
        _remove(tmp)


def check_size(expected: int) -> Verify:
    """A ``verify`` for :func:`atomic_path`: the file holds exactly ``expected`` bytes."""

    def verify(tmp: Path) -> None:
        size = tmp.stat().st_size
        if size != expected:
            raise OSError(errno.EIO, f'short write ({size} of {expected} bytes reached the disk)')

    return verify


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, verify: Verify | None = None,
                       overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`), checking the size written and, when
    given, ``verify(tmp)`` (e.g. that an image decodes back)."""
    size = check_size(len(data))

    def check(tmp: Path) -> None:
        size(tmp)
        if verify is not None:
            verify(tmp)

    with atomic_path(path, check, overwrite) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and its parents that do not exist yet, innermost first (what ``mkdir(parents=True)`` makes)."""
    folder, missing = Path(folder), []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty: what a failed run made and did not use."""
    try:
        for folder in folders:
            if any(folder.iterdir()):
                return
            folder.rmdir()
    except OSError:
        pass
