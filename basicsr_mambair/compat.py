"""Make BasicSR importable, usable and safe on today's torch/torchvision and on machines without a GPU.

BasicSR 1.4.2 (the PyPI release) predates torchvision 0.17, assumes CUDA in a few places of its
training pipeline, runs code from option files (``yaml.Loader``, ``eval``/``exec`` of ``--force_yml``)
and lets a failing log file print a traceback per line. Everything here is a small, targeted fix of
one of those places; each is a no-op where BasicSR (e.g. its git master) already does the right thing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import os.path as osp
import sys

from .errors import NothingToDo, OptionError


def alias_functional_tensor() -> None:
    """Provide ``torchvision.transforms.functional_tensor`` where it no longer exists.

    BasicSR 1.4.2 imports ``rgb_to_grayscale`` from it (removed in torchvision 0.17); the same
    function lives in ``torchvision.transforms.functional``. Must run before ``import basicsr``.
    """
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # torchvision itself missing: let basicsr report it
        return
    if not found:
        import torchvision.transforms.functional as functional

        sys.modules[name] = functional


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def init_dist(launcher: str, backend: str | None = None, **kwargs) -> None:
    """Initialise torch.distributed for ``--launcher pytorch|slurm`` with or without GPUs.

    BasicSR's version always selects a CUDA device (ZeroDivisionError without one) and uses
    nccl. Here: nccl with GPUs, gloo without.
    """
    import subprocess

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')
    use_cuda = cuda_available()
    if backend is None or (backend == 'nccl' and not use_cuda):  # option files often name nccl
        backend = 'nccl' if use_cuda else 'gloo'
    if launcher == 'pytorch':
        rank = int(os.environ['RANK'])
        local_rank = int(os.environ.get('LOCAL_RANK', rank))
    elif launcher == 'slurm':
        rank = int(os.environ['SLURM_PROCID'])
        ntasks = int(os.environ['SLURM_NTASKS'])
        num_local = torch.cuda.device_count() if use_cuda else 1
        local_rank = rank % num_local
        port = kwargs.pop('port', None)
        if port is not None:
            os.environ['MASTER_PORT'] = str(port)
        os.environ.setdefault('MASTER_PORT', '29500')
        node_list = os.environ['SLURM_NODELIST']
        os.environ['MASTER_ADDR'] = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
        os.environ['WORLD_SIZE'] = str(ntasks)
        os.environ['LOCAL_RANK'] = str(local_rank)
        os.environ['RANK'] = str(rank)
    else:
        raise ValueError(f'Invalid launcher type: {launcher}')
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, **kwargs)


def model_to_device(self, net):
    """``BaseModel.model_to_device`` that also works on CPU under DDP.

    BasicSR passes ``device_ids=[torch.cuda.current_device()]`` unconditionally; on CPU DDP must
    be built without ``device_ids``.
    """
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    net = net.to(self.device)
    if self.opt['dist']:
        find_unused = self.opt.get('find_unused_parameters', False)
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


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



def parse_options(root_path: str, is_train: bool = True) -> tuple[dict, object]:
    """BasicSR's ``parse_options`` (same command line, same derived paths) without running code from options.

    BasicSR 1.4.2 reads the option file with ``yaml.Loader`` (``!!python/object/apply`` tags run), ``eval``s
    ``--force_yml`` values starting with ``[`` and ``exec``s the keys. Here the file goes through
    :func:`~basicsr_mambair.options.read_option_file` (safe loader, BasicSR's types) and the overrides through
    :func:`~basicsr_mambair.options.apply_overrides` (YAML values, existing keys only), applied before the
    derived settings below so that e.g. ``--force_yml name=...`` moves the experiment folder.
    """
    import argparse
    import random

    import torch
    from basicsr.utils import set_random_seed
    from basicsr.utils.dist_util import get_dist_info

    from .options import apply_overrides, read_option_file

    parser = argparse.ArgumentParser()
    parser.add_argument('-opt', type=str, required=True, help='Path to option YAML file.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none', help='job launcher')
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--debug', action='store_true')
    parser.add_argument('--local_rank', type=int, default=0)
    parser.add_argument('--force_yml', nargs='+', default=None, help='e.g. train:ema_decay=0.999')
    args = parser.parse_args()

    opt = apply_overrides(read_option_file(args.opt), args.force_yml)
    opt['dist'] = args.launcher != 'none'
    if not opt['dist']:
        print('Disable distributed.', flush=True)
    elif args.launcher == 'slurm' and 'dist_params' in opt:
        init_dist(args.launcher, **opt['dist_params'])
    else:
        init_dist(args.launcher)
    opt['rank'], opt['world_size'] = get_dist_info()

    if opt.get('manual_seed') is None:
        opt['manual_seed'] = random.randint(1, 10000)
    set_random_seed(opt['manual_seed'] + opt['rank'])
    opt['auto_resume'] = args.auto_resume
    opt['is_train'] = is_train
    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']
    if opt['num_gpu'] == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()

    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]  # val_1, test_2, ...
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in ('dataroot_gt', 'dataroot_lq'):
            if dataset.get(key) is not None:
                dataset[key] = osp.expanduser(dataset[key])
    for key, val in opt['path'].items():
        if val is not None and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = osp.expanduser(val)

    root = osp.join(root_path, 'experiments' if is_train else 'results', opt['name'])
    if is_train:
        opt['path'].update(experiments_root=root, models=osp.join(root, 'models'), log=root,
                           training_states=osp.join(root, 'training_states'),
                           visualization=osp.join(root, 'visualization'))
        if 'debug' in opt['name']:
            if 'val' in opt:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        opt['path'].update(results_root=root, log=root, visualization=osp.join(root, 'visualization'))
    return opt, args


def _stop_logging_to(handler: logging.FileHandler, logger: logging.Logger) -> None:
    """``handler.handleError``: on the first failed write (full disk, I/O error) say so in one line and stop
    writing the log file, instead of printing a traceback for every later log line."""
    exc = sys.exc_info()[1]
    logger.removeHandler(handler)
    prog = osp.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'basicsr'
    reason = getattr(exc, 'strerror', None) or exc
    print(f'{prog}: warning: cannot write the log file {handler.baseFilename}: {reason}; it is not written any '
          'more (the console still is)', file=sys.stderr, flush=True)


def get_root_logger(logger_name: str = 'basicsr', log_level: int = logging.INFO, log_file: str | None = None):
    """BasicSR's ``get_root_logger`` whose log file, once it cannot be written, is dropped with one line."""
    from basicsr.utils.logger import get_root_logger as basicsr_get_root_logger

    logger = basicsr_get_root_logger(logger_name, log_level, log_file)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and not getattr(handler, 'mambair_guarded', False):
            handler.handleError = lambda record, h=handler: _stop_logging_to(h, logger)
            handler.mambair_guarded = True
    return logger


_PATCHED = False


def patch_basicsr() -> None:
    """Install the CPU-safe pieces into BasicSR's pipeline (idempotent): distributed init and DDP without
    GPUs, a resume that needs no GPU, option parsing that never runs code, and a log file that fails once.

    Called by our train/test entry points, not at package import, so merely importing the
    plugin never changes BasicSR's behaviour.
    """
    global _PATCHED
    if _PATCHED:
        return
    import basicsr.train
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options as options
    from basicsr.models.base_model import BaseModel

    dist_util.init_dist = init_dist
    options.init_dist = init_dist
    options.parse_options = parse_options
    basicsr.train.parse_options = parse_options
    basicsr.train.get_root_logger = get_root_logger
    BaseModel.model_to_device = model_to_device
    basicsr.train.load_resume_state = load_resume_state
    _PATCHED = True
