"""Command-line entry points ``mambair-train`` / ``mambair-test`` around BasicSR's pipelines.

BasicSR's ``train_pipeline`` / ``test_pipeline`` do the work; this module adds what a user of
them misses: a documented ``--help``, experiments rooted in the current working directory (not
in site-packages), the CPU-safe pieces of :mod:`basicsr_mambair.compat`, a resume that works
without a GPU, checks of the option file before anything is written, and one readable error
line instead of a traceback wall.
"""

from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import sys
import traceback
from collections.abc import Callable, Sequence

import basicsr_mambair  # noqa: F401  (registers our archs/datasets/models; aliases torchvision)


class OptionError(Exception):
    """A problem with the option file or the command line that the user must fix."""


class NothingToDo(Exception):
    """The requested work is already done (e.g. resuming a finished experiment)."""


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


def read_option_file(path: str) -> dict:
    """Parse an option file with BasicSR's (ordered) YAML loader; clear errors for common slips."""
    import yaml
    from basicsr.utils.options import ordered_yaml

    if not osp.isfile(path):
        raise OptionError(f'option file not found: {path}')
    with open(path) as f:
        try:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
        except yaml.YAMLError as e:
            raise OptionError(f'{path} is not valid YAML: {" ".join(str(e).split())}') from None
    if not isinstance(opt, dict):
        raise OptionError(f'{path} does not hold a mapping of options')
    return opt


def apply_overrides(opt: dict, entries: Sequence[str] | None) -> dict:
    """Apply ``--force_yml key:sub=value`` entries as BasicSR will, so checks see the final options."""
    from basicsr.utils.options import _postprocess_yml_value

    for entry in entries or ():
        if '=' not in entry:
            raise OptionError(f"--force_yml entries look like key:sub=value, got '{entry}'")
        keys, value = (part.strip() for part in entry.split('=', 1))
        node = opt
        *parents, last = keys.split(':')
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise OptionError(f"--force_yml {entry}: no option '{key}' to update (new keys cannot be created)")
            node = node[key]
        if last not in node:
            raise OptionError(f"--force_yml {entry}: no option '{last}' to update (new keys cannot be created)")
        node[last] = _postprocess_yml_value(value)
    return opt


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_options(opt: dict, path: str, is_train: bool) -> None:
    """Catch the usual mistakes before BasicSR creates folders or builds anything."""
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

    for key in ('name', 'model_type', 'datasets', 'path'):
        if key not in opt:
            raise OptionError(f"{path}: missing top-level key '{key}'")
    if opt['model_type'] not in MODEL_REGISTRY:
        raise OptionError(f"{path}: unknown model_type '{opt['model_type']}' "
                          f'(registered: {", ".join(sorted(MODEL_REGISTRY._obj_map))})')
    for key, net_opt in opt.items():
        if key.startswith('network_'):
            arch = (net_opt or {}).get('type')
            if arch not in ARCH_REGISTRY:
                raise OptionError(f"{path}: unknown arch type '{arch}' in {key} "
                                  f'(registered: {", ".join(sorted(ARCH_REGISTRY._obj_map))})')
    if not isinstance(opt['datasets'], dict) or not opt['datasets']:
        raise OptionError(f"{path}: 'datasets' must map phases (train, val, test_1, ...) to datasets")
    for phase, ds in opt['datasets'].items():
        if ds.get('type') not in DATASET_REGISTRY:
            raise OptionError(f"{path}: unknown dataset type '{ds.get('type')}' in datasets:{phase}")
        backend = (ds.get('io_backend') or {}).get('type', 'disk')
        for root_key in ('dataroot_gt', 'dataroot_lq', 'meta_info_file'):
            if ds.get(root_key) is None:
                continue
            for root in _as_list(ds[root_key]):
                root = osp.expanduser(str(root))
                if backend != 'disk' and root_key != 'meta_info_file':
                    ok = osp.isdir(root) or osp.isfile(root)
                else:
                    ok = osp.exists(root)
                if not ok:
                    raise OptionError(f'datasets:{phase}:{root_key} not found: {root} '
                                      f'(see datasets/README.md for how to prepare it)')
    paths = opt.get('path') or {}
    for key, value in paths.items():
        if key.startswith('pretrain_network') and value is not None and not osp.isfile(osp.expanduser(value)):
            raise OptionError(f'path:{key} not found: {value} (see experiments/pretrained_models/README.md)')
    if is_train and 'train' not in opt:
        raise OptionError(f"{path}: missing top-level key 'train' (losses, optimizer, total_iter)")
    _check_speed_options(opt, path, is_train)


def _check_speed_options(opt: dict, path: str, is_train: bool) -> None:
    """``train:use_amp`` and ``network_g:compile`` (ours, unknown to BasicSR) fit this machine."""
    import torch

    from .models.mambair_model import compile_options
    from .utils.amp import amp_dtype

    try:
        compile_options((opt.get('network_g') or {}).get('compile'))
        if is_train and (opt.get('train') or {}).get('use_amp') is not None:
            device = 'cuda' if torch.cuda.is_available() and opt.get('num_gpu', 'auto') != 0 else 'cpu'
            amp_dtype(opt['train']['use_amp'], device)
    except ValueError as exc:
        raise OptionError(f'{path}: {exc}') from None


def _state_iter(filename: str) -> int | None:
    stem = filename[:-len('.state')] if filename.endswith('.state') else None
    return int(stem) if stem is not None and stem.isdigit() else None


def load_resume_state(opt: dict):
    """BasicSR's ``load_resume_state`` without its CUDA call, with ``weights_only`` loading.

    With ``--auto_resume`` the newest state that loads (and whose network file exists) wins, so
    a state half-written when a run was killed does not block resuming from the previous one.
    """
    import torch
    from basicsr.utils.misc import check_resume

    candidates: list[str] = []
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        if osp.isdir(state_dir):
            iters = sorted((i for i in map(_state_iter, os.listdir(state_dir)) if i is not None), reverse=True)
            candidates = [osp.join(state_dir, f'{i}.state') for i in iters]
    elif opt['path'].get('resume_state'):
        candidates = [osp.expanduser(opt['path']['resume_state'])]
        if not osp.isfile(candidates[0]):
            raise OptionError(f'path:resume_state not found: {candidates[0]}')

    for state_path in candidates:
        try:
            state = torch.load(state_path, map_location='cpu', weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated file must not stop the resume
            if not opt['auto_resume']:
                raise OptionError(f'cannot read training state {state_path}: {e}') from None
            print(f'Skipping unreadable training state {state_path}: {e}', file=sys.stderr, flush=True)
            continue
        nets = [k.replace('network_', '') for k in opt if k.startswith('network_')]
        missing = [n for n in nets if not osp.isfile(osp.join(opt['path']['models'], f"net_{n}_{state['iter']}.pth"))]
        if missing and opt['auto_resume']:
            print(f'Skipping training state {state_path}: no net_{missing[0]}_{state["iter"]}.pth beside it',
                  file=sys.stderr, flush=True)
            continue
        total = int(opt['train']['total_iter'])
        if state['iter'] >= total:
            raise NothingToDo(f"experiment '{opt['name']}' already finished ({state['iter']}/{total} iterations); "
                              'nothing to resume')
        opt['path']['resume_state'] = state_path
        check_resume(opt, state['iter'])  # BasicSR's logger is not set up yet: it must not be called here
        return state
    if candidates:  # starting afresh would archive the experiment: let the user decide
        raise OptionError(f'--auto_resume: no usable training state in {osp.dirname(candidates[0])} '
                          f'({len(candidates)} found, none readable with its network file)')
    return None


def _log_file() -> str | None:
    for handler in logging.getLogger('basicsr').handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def _one_line(e: BaseException) -> str:
    msg = ' '.join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError) and "registry" in msg:
        return msg.strip('"\'')
    if isinstance(e, (OptionError, NothingToDo)):
        return msg
    return f'{type(e).__name__}: {msg}'


def run(pipeline: Callable[[str], None], is_train: bool, argv: Sequence[str] | None = None) -> int:
    """Parse and check the command line, then run ``pipeline(root_path)`` with readable errors."""
    parser = build_parser(is_train)
    args = parser.parse_args(argv)
    try:
        opt = apply_overrides(read_option_file(args.opt), args.force_yml)
        check_options(opt, args.opt, is_train)
        from . import compat

        compat.patch_basicsr()
        sys.argv = [parser.prog, *_basicsr_argv(args)]  # BasicSR's parse_options reads sys.argv
        pipeline(os.getcwd())
    except NothingToDo as e:
        print(f'{parser.prog}: {e}', file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print(f'{parser.prog}: interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets one line; the details go to the log
        log_file = _log_file()
        if log_file is not None:  # the file only: the console gets the one line below
            with open(log_file, 'a') as f:
                f.write(traceback.format_exc())
        if os.environ.get('MAMBAIR_TRACEBACK'):
            traceback.print_exc()
        where = f' (traceback in {log_file})' if log_file else ' (set MAMBAIR_TRACEBACK=1 for the traceback)'
        print(f'{parser.prog}: error: {_one_line(e)}'
              + ('' if isinstance(e, OptionError) else where), file=sys.stderr)
        return 1
    return 0


def main_train(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-train``."""
    import basicsr.train

    basicsr.train.load_resume_state = load_resume_state
    return run(basicsr.train.train_pipeline, is_train=True, argv=argv)


def main_test(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-test``: BasicSR's test pipeline plus a results table."""
    from .evaluation import test_pipeline

    return run(test_pipeline, is_train=False, argv=argv)
