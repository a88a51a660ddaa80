"""What every command shares: messages on stderr and the exit status.

Exit status: 0 = everything done (or nothing left to do), 1 = some of the work failed, 2 = nothing ran (bad
options, inputs or environment), 130 = interrupted. Every problem is one line ``<prog>: error: <what>``;
:class:`~basicsr_mambair.errors.MambaIRError` messages are meant for the user as they are, anything else is
prefixed with its type (``MAMBAIR_TRACEBACK=1`` prints the traceback too).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from ..errors import MambaIRError, NothingToDo, describe_error

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_NOTHING_RAN = 2
EXIT_INTERRUPTED = 130


def _write(line: str) -> None:
    from tqdm import tqdm  # keeps a progress bar intact when one is shown

    tqdm.write(line, file=sys.stderr)


def one_line(exc: BaseException) -> str:
    """A user error as its message; anything else as ``Type: message``; always one line."""
    if isinstance(exc, MambaIRError):
        return describe_error(exc)
    return f'{type(exc).__name__}: {describe_error(exc)}'


def error(prog: str, message: str | BaseException, path: str | None = None) -> None:
    """Print ``<prog>: error: <message> (<path>)`` on one line."""
    text = one_line(message) if isinstance(message, BaseException) else ' '.join(str(message).split())
    _write(f'{prog}: error: {text}' + (f' ({path})' if path else ''))


def note(prog: str, message: str) -> None:
    """Print ``<prog>: <message>`` (not an error)."""
    _write(f'{prog}: {message}')


def run_command(prog: str, body: Callable[[], int]) -> int:
    """``body()``'s exit status; a :class:`MambaIRError` escaping it is one line and status 2, another exception
    one line and status 1 (with the traceback when ``MAMBAIR_TRACEBACK`` is set), Ctrl-C status 130."""
    try:
        return body()
    except NothingToDo as exc:
        note(prog, describe_error(exc))
        return EXIT_OK
    except MambaIRError as exc:
        error(prog, exc)
        return EXIT_NOTHING_RAN
    except KeyboardInterrupt:
        note(prog, 'interrupted')
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001  (a bug, but still one line for the user)
        if os.environ.get('MAMBAIR_TRACEBACK'):
            traceback.print_exc()
        error(prog, f'{one_line(exc)} (set MAMBAIR_TRACEBACK=1 for the traceback)')
        return EXIT_SOME_FAILED
