"""Atomic file writes: a result appears under its final name complete, or not at all.

A run killed or failing while writing (full disk, I/O error) leaves the previous file (or none), never a
truncated one that a rerun would take for finished work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is fsynced and renamed to ``path``.

    On any exception the temporary file is removed and ``path`` is untouched. The temporary name starts with
    a dot and ends with ``.tmp<pid>``, so concurrent writers never clash and listings skip it. Without
    ``overwrite`` an existing ``path`` is never replaced: FileExistsError, also when it appears while writing
    (the last step is then a hard link, which fails rather than replaces; where the file system has no hard
    links, a check just before the rename).
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f'{path} exists')
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f'{path} exists') from None
            except OSError:  # no hard links here (some network/FAT file systems)
                if os.path.lexists(path):
                    raise FileExistsError(f'{path} exists') from None
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`), checking the size written."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)
        if tmp.stat().st_size != len(data):
            raise OSError(f'short write: {tmp.stat().st_size} of {len(data)} bytes of {Path(path).name}')
