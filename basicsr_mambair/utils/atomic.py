"""Writing a file so that readers never see a partial one, and an existing file is kept unless asked otherwise."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_bytes_atomic(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (fsync, then rename).

    A run killed at any point leaves the previous file (or none), never a truncated one. Without
    ``overwrite`` an existing ``path`` is left alone: FileExistsError, also when it appears while writing
    (the final step is a hard link, which fails rather than replaces; where the file system has no hard
    links, a check just before an ordinary rename).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f'{path} exists')
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is meant for secrets, not for results
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
        _fsync_folder(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
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
