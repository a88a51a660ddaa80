"""``mambair-train`` / ``mambair-test``: BasicSR's training and test pipelines, with what their users miss.

BasicSR's ``train_pipeline`` / ``test_pipeline`` do the work (HAT's ``train.py`` pattern); this module adds a
documented ``--help``, experiments rooted in the current working directory (not in site-packages), checks of
the option file before anything is written (the pipeline itself reads it through
:func:`basicsr_mambair.compat.parse_options`, installed when the package is imported), and one readable error
line and exit status instead of a traceback wall (the traceback goes to the run's log file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

import basicsr_mambair  # noqa: F401  (registers our archs/datasets/models; aliases torchvision)

from ..errors import MambaIRError, NothingToDo, OptionError
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


def _one_line(e: BaseException) -> str:
    msg = ' '.join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError) and 'registry' in msg:  # BasicSR's "No object named X found in Y registry!"
        return msg.strip('"\'')
    if isinstance(e, MambaIRError):
        return msg
    return f'{type(e).__name__}: {msg}'


def run(pipeline: Callable[[str], None], is_train: bool, argv: Sequence[str] | None = None) -> int:
    """Parse and check the command line, then run ``pipeline(root_path)``; returns the exit status (0 done or
    nothing to do, 1 the run failed, 2 the options were rejected before anything ran)."""
    parser = build_parser(is_train)
    args = parser.parse_args(argv)

    def prepare() -> int:
        check_options(load_options(args.opt, args.force_yml), args.opt, is_train)
        return EXIT_OK

    status = run_command(parser.prog, prepare)
    if status != EXIT_OK:
        return status
    sys.argv = [parser.prog, *_basicsr_argv(args)]  # BasicSR's parse_options reads sys.argv
    try:
        pipeline(os.getcwd())
    except NothingToDo as e:
        note(parser.prog, str(e))
        return EXIT_OK
    except KeyboardInterrupt:
        note(parser.prog, 'interrupted')
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets one line; the details go to the log
        log_file = _log_file()
        if log_file is not None:  # the file only: the console gets the one line below
            with open(log_file, 'a') as f:
                f.write(traceback.format_exc())
        if os.environ.get('MAMBAIR_TRACEBACK'):
            traceback.print_exc()
        where = f' (traceback in {log_file})' if log_file else ' (set MAMBAIR_TRACEBACK=1 for the traceback)'
        error(parser.prog, _one_line(e) + ('' if isinstance(e, OptionError) else where))
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
