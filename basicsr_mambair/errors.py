"""Every error basicsr-mambair raises on purpose, under one base class :class:`MambaIRError`.

Catch ``MambaIRError`` for "a problem the user must fix, with a one-line message"; anything else that
escapes the package is a bug. The commands (``basicsr_mambair.cli``) turn these into one line on stderr and
an exit status (see ``cli/common.py``).
"""

from __future__ import annotations

__all__ = ['MambaIRError', 'describe_error', 'OptionError', 'NothingToDo', 'CheckpointError', 'RestoreError',
           'ImageError', 'OutOfMemory', 'KernelUnavailable', 'NonFiniteLossError', 'ToolError', 'ExportError',
           'CheckFailed']


class MambaIRError(Exception):
    """Base of every error the package raises on purpose; ``str(e)`` is one line for the user."""


def describe_error(exc: BaseException) -> str:
    """``exc`` as one line: its message on one line, followed by ``(<path>)`` when it names a file."""
    message = ' '.join(str(exc).split()) or type(exc).__name__
    path = getattr(exc, 'path', None)
    return f'{message} ({path})' if path else message


class OptionError(MambaIRError):
    """A problem with an option file or a command line that the user must fix (nothing was run)."""


class NothingToDo(MambaIRError):
    """The requested work is already done (e.g. resuming a finished experiment): not a failure."""


class CheckpointError(MambaIRError, RuntimeError):
    """A checkpoint cannot be read safely, is not a MambaIR-family state dict, or does not fit the network."""


class RestoreError(MambaIRError):
    """A problem with the model, device or options of a restoration (nothing was restored)."""


class ImageError(MambaIRError):
    """One image could not be read or restored (unreadable, unsupported layout, out of memory, ...).

    ``path`` names the file when there is one (messages then read ``<what> (<path>)``).
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # keep ``path`` when raised in a worker process
        return type(self), (str(self), self.path)


class OutOfMemory(ImageError):
    """The forward ran out of memory; ``suggested_tile`` (LQ pixels) should fit better."""

    def __init__(self, message: str, suggested_tile: int) -> None:
        super().__init__(message)
        self.suggested_tile = suggested_tile

    def __reduce__(self):
        return type(self), (str(self), self.suggested_tile)


class KernelUnavailable(MambaIRError, RuntimeError):
    """A scan kernel cannot be used here (no compiler, failed build or self-check, missing package)."""


class NonFiniteLossError(MambaIRError, RuntimeError):
    """Training produced a NaN/inf loss; continuing would only write broken checkpoints."""


class ToolError(MambaIRError):
    """A problem with the input or output of a data tool that the user must fix."""


class ExportError(MambaIRError):
    """A network cannot be exported (missing packages, bad arguments, an exporter failure, non-standard ops)."""


class CheckFailed(ExportError):
    """An exported graph, run with ONNX Runtime, differs from PyTorch by more than the tolerance."""
