"""``mambair-train`` / ``mambair-test``: BasicSR's training and test pipelines, with what their users miss.

BasicSR's ``train_pipeline`` / ``test_pipeline`` do the work (HAT's ``train.py`` pattern); this module adds a
documented ``--help``, experiments rooted in the current working directory (not in site-packages), checks of
the option file before anything is written (the pipeline itself reads it through
:func:`basicsr_mambair.compat.parse_options`, installed when the package is imported), and one readable error
line and exit status instead of a traceback wall (the traceback goes to the run's log file).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import basicsr_mambair  # noqa: F401  (registers our archs/datasets/models; aliases torchvision)

from ..errors import MambaIRError, NothingToDo, OptionError, describe_error
from ..options import check_options, load_options
from .common import EXIT_NOTHING_RAN, EXIT_OK, EXIT_SOME_FAILED, error, note, run_command


def build_parser(is_train: bool) -> argparse.ArgumentParser:
    """The command line of BasicSR's ``parse_options``, documented."""
    what = 'Train' if is_train else 'Test'
    parser = argparse.ArgumentParser(
        prog='mambair-train' if is_train else 'mambair-test',
        description=(
            f'{what} an image-restoration network with a BasicSR option file. MambaIR archs, '
            'datasets and models of basicsr-mambair are registered automatically. Outputs go to '
            f'./{"experiments/<name>" if is_train else "results/<name>"} under the current working '
            'directory.'),
        epilog=('examples:\n'
                f'  mambair-{"train" if is_train else "test"} -opt options/'
                f'{"train/train_MambaIR_lightSR_x2.yml" if is_train else "test/test_MambaIR_lightSR_x2.yml"}\n'
                + ('  mambair-train -opt X.yml --auto_resume\n'
                   '  torchrun --nproc_per_node=2 -m basicsr_mambair.train -opt X.yml --launcher pytorch\n'
                   if is_train else '')
                + '  ... --force_yml train:total_iter=1000 val:val_freq=500'),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', required=True, metavar='YML', help='path to the option YAML file')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='distributed launcher: pytorch for torchrun (gloo on CPU, nccl on GPUs), '
                        'slurm for srun; default: none (single process)')
    parser.add_argument('--auto_resume', action='store_true',
                        help='resume from the newest training state of this experiment, if any')
    parser.add_argument('--debug', action='store_true',
                        help="prefix the experiment name with 'debug_' (frequent logs, no TensorBoard)")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--force_yml', nargs='+', default=None, metavar='KEY=VALUE',
                        help="override option values, keys joined by ':', e.g. train:ema_decay=0.999")
    return parser


def _basicsr_argv(args: argparse.Namespace) -> list[str]:
    """The same arguments in the spelling BasicSR's own parser accepts."""
    argv = ['-opt', args.opt, '--launcher', args.launcher, '--local_rank', str(args.local_rank)]
    if args.auto_resume:
        argv.append('--auto_resume')
    if args.debug:
        argv.append('--debug')
    if args.force_yml:
        argv += ['--force_yml', *args.force_yml]
    return argv


def _log_file() -> str | None:
    for handler in logging.getLogger('basicsr').handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


DISK_ERRORS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS)


def _one_line(e: BaseException, is_train: bool = False) -> str:
    if isinstance(e, OSError) and e.errno in DISK_ERRORS:  # written atomically: nothing half-written remains
        what = e.filename or 'a file'
        return (f'cannot write {what}: {e.strerror}; the run stopped' +
                ('; its last complete checkpoint stays the resume point (--auto_resume)' if is_train else ''))
    msg = ' '.join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError) and 'registry' in msg:  # BasicSR's "No object named X found in Y registry!"
        return msg.strip('"\'')
    if isinstance(e, MambaIRError):
        return describe_error(e)
    return f'{type(e).__name__}: {msg}'


class RunFolders:
    """The folders a run creates (``experiments/<name>``, ``tb_logger/<name>`` or ``results/<name>``), so that a
    run failing before it did any work leaves nothing behind (and BasicSR's ``<name>_archived_<time>`` renaming
    of an older folder is undone)."""

    # files a run writes before any work: its log, the copy of the option file, an empty TensorBoard file
    STARTUP_SUFFIXES = ('.log', '.yml', '.yaml')

    def __init__(self, opt: dict, args: argparse.Namespace, is_train: bool) -> None:
        name = str(opt['name'])
        if args.debug and not name.startswith('debug'):
            name = 'debug_' + name
        cwd = Path.cwd()
        self.folders = [cwd / ('experiments' if is_train else 'results') / name]
        if is_train and (opt.get('logger') or {}).get('use_tb_logger') and 'debug' not in name:
            self.folders.append(cwd / 'tb_logger' / name)
        self.existed = {f: f.exists() for f in self.folders + [f.parent for f in self.folders]}
        self.archives = {f: set(self._archives(f)) for f in self.folders}

    @staticmethod
    def _archives(folder: Path) -> list[Path]:
        return list(folder.parent.glob(f'{folder.name}_archived_*')) if folder.parent.is_dir() else []

    @classmethod
    def _holds_work(cls, folder: Path) -> bool:
        return any(p.is_file() and not (p.name.endswith(cls.STARTUP_SUFFIXES) or p.name.startswith('events.out.'))
                   for p in folder.rglob('*'))

    def remove_if_no_work(self, keep_log: str | None) -> str | None:
        """Remove the folders this run created if none holds work; returns where the log was kept (a copy in
        the temporary folder) when ``keep_log`` was inside a removed folder, else ``keep_log``."""
        if os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')) != '0':
            return keep_log  # rank 0 made the folders
        created = [f for f in self.folders if f.is_dir() and
                   (not self.existed[f] or set(self._archives(f)) - self.archives[f])]
        if not created or any(self._holds_work(f) for f in created):
            return keep_log
        for folder in created:
            if keep_log and Path(keep_log).resolve().is_relative_to(folder.resolve()):
                keep_log = _copy_to_temp(keep_log, folder.name)
            shutil.rmtree(folder, ignore_errors=True)
            new_archives = sorted(set(self._archives(folder)) - self.archives[folder])
            if len(new_archives) == 1 and not folder.exists():
                new_archives[0].rename(folder)  # BasicSR moved the previous run aside: put it back
            if not self.existed[folder.parent] and folder.parent.is_dir() and not any(folder.parent.iterdir()):
                folder.parent.rmdir()  # ./experiments, ./results or ./tb_logger made by this run
        return keep_log


def _copy_to_temp(log_file: str, name: str) -> str | None:
    try:
        fd, path = tempfile.mkstemp(prefix=f'mambair-{name}-', suffix='.log')
        with os.fdopen(fd, 'wb') as out, open(log_file, 'rb') as src:
            shutil.copyfileobj(src, out)
        return path
    except OSError:
        return None


def _append_traceback(log_file: str | None) -> str | None:
    """Append the current traceback to the run's log; None when the log cannot be written (full disk)."""
    if log_file is None:
        return None
    try:
        with open(log_file, 'a') as f:
            f.write(traceback.format_exc())
        return log_file
    except OSError:
        return None


def run(pipeline: Callable[[str], None], is_train: bool, argv: Sequence[str] | None = None) -> int:
    """Parse and check the command line, then run ``pipeline(root_path)``; returns the exit status (0 done or
    nothing to do, 1 the run failed, 2 the options were rejected before anything ran)."""
    parser = build_parser(is_train)
    args = parser.parse_args(argv)
    checked: list[dict] = []

    def prepare() -> int:
        opt = load_options(args.opt, args.force_yml)
        check_options(opt, args.opt, is_train)
        checked.append(opt)
        return EXIT_OK

    status = run_command(parser.prog, prepare)
    if status != EXIT_OK:
        return status
    folders = RunFolders(checked[0], args, is_train)
    sys.argv = [parser.prog, *_basicsr_argv(args)]  # BasicSR's parse_options reads sys.argv
    try:
        pipeline(os.getcwd())
    except NothingToDo as e:
        note(parser.prog, str(e))
        return EXIT_OK
    except KeyboardInterrupt:
        folders.remove_if_no_work(None)
        note(parser.prog, 'interrupted')
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets one line; the details go to the log
        log_file = folders.remove_if_no_work(_append_traceback(_log_file()))  # the log file only, not the console
        if os.environ.get('MAMBAIR_TRACEBACK'):
            traceback.print_exc()
        where = f' (traceback in {log_file})' if log_file else ' (set MAMBAIR_TRACEBACK=1 for the traceback)'
        error(parser.prog, _one_line(e, is_train) + ('' if isinstance(e, OptionError) else where))
        return EXIT_NOTHING_RAN if isinstance(e, OptionError) else EXIT_SOME_FAILED
    return EXIT_OK


def main_train(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-train``."""
    import basicsr.train

    return run(basicsr.train.train_pipeline, is_train=True, argv=argv)


def main_test(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-test``: BasicSR's test pipeline plus a results table."""
    from ..evaluation import test_pipeline

    return run(test_pipeline, is_train=False, argv=argv)
