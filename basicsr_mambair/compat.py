"""Make BasicSR importable, usable and safe on today's torch/torchvision and on machines without a GPU.

BasicSR 1.4.2 (the PyPI release) predates torchvision 0.17, assumes CUDA in a few places of its
training pipeline (distributed init, DDP, resume, the Real-ESRGAN models), runs code from option files
(``yaml.Loader``, ``eval``/``exec`` of ``--force_yml``), knows neither the official MambaIR option
dialect nor our checks, and lets a failing log file print a traceback per line. Everything here is a
small, targeted fix of one of those places; each is a no-op where BasicSR (e.g. its git master) already
does the right thing. :func:`patch_basicsr` installs them when the package is imported, so a
plugin-style script (``import basicsr_mambair`` then BasicSR's ``train_pipeline``, HAT's pattern) gets
what ``mambair-train`` gets.
"""

from __future__ import annotations

import argparse
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



def parse_options(root_path: str, is_train: bool = True) -> tuple[dict, argparse.Namespace]:
    """BasicSR's ``parse_options`` (same command line, same resulting ``opt``), reading the option file with
    :func:`basicsr_mambair.options.load_options` and checking it before anything is created.

    BasicSR 1.4.2 reads the option file with ``yaml.Loader`` (``!!python/object/apply`` tags run), ``eval``s
    ``--force_yml`` values starting with ``[`` and ``exec``s the keys; here the file is read with a safe loader
    and the overrides are parsed as YAML values (:mod:`basicsr_mambair.options`), before the derived settings
    below, so that e.g. ``--force_yml name=...`` moves the experiment folder. What else BasicSR's version
    lacks: the official MambaIR dialect (``task:``/``noise`` datasets, lists of data roots,
    ``ImageCleanModel``), ``num_gpu`` above the GPUs present, ``--force_yml`` for optional keys the file leaves
    out, and one clear error (naming the key) before the experiment folder exists.
    """
    import random

    import torch
    from basicsr.utils import set_random_seed
    from basicsr.utils.dist_util import get_dist_info

    from .options import check_options, load_options

    parser = argparse.ArgumentParser()
    parser.add_argument('-opt', type=str, required=True, help='Path to option YAML file.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none', help='job launcher')
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--debug', action='store_true')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    parser.add_argument('--force_yml', nargs='+', default=None, help='e.g. train:ema_decay=0.999')
    args = parser.parse_args()

    opt = load_options(args.opt, args.force_yml)
    check_options(opt, args.opt, is_train)

    if args.launcher == 'none':
        opt['dist'] = False
        print('Disable distributed.', flush=True)
    else:
        opt['dist'] = True
        dist_params = opt.get('dist_params') or {}
        init_dist(args.launcher, **(dist_params if args.launcher == 'slurm' else {}))
    opt['rank'], opt['world_size'] = get_dist_info()

    seed = opt.get('manual_seed')
    if seed is None:
        seed = opt['manual_seed'] = random.randint(1, 10000)
    set_random_seed(seed + opt['rank'])

    opt['auto_resume'] = args.auto_resume
    opt['is_train'] = is_train
    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']
    if opt.get('num_gpu', 'auto') == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()

    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]  # val_1, test_2, ... -> val, test
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in ('dataroot_gt', 'dataroot_lq'):
            if dataset.get(key) is not None:
                dataset[key] = osp.expanduser(dataset[key])
    for key, value in opt['path'].items():
        if value is not None and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = osp.expanduser(value)

    if is_train:
        root = osp.join(root_path, 'experiments', opt['name'])
        opt['path'].update(experiments_root=root, models=osp.join(root, 'models'),
                           training_states=osp.join(root, 'training_states'), log=root,
                           visualization=osp.join(root, 'visualization'))
        if 'debug' in opt['name']:
            if 'val' in opt:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        root = osp.join(root_path, 'results', opt['name'])
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


def real_esrgan_init(model_cls: type):
    """``__init__`` for BasicSR's ``RealESRNetModel`` / ``RealESRGANModel`` (``model_cls``) on any device.

    BasicSR's puts its JPEG simulator (``DiffJPEG``) and USM sharpener on ``.cuda()`` unconditionally, which
    fails without a GPU; here they follow the model's device (``'cuda'`` where BasicSR would use it). The rest
    is BasicSR's: the parent's ``__init__`` and the training-pair pool size.
    """
    from basicsr.utils import DiffJPEG, USMSharp

    def __init__(self, opt: dict) -> None:
        super(model_cls, self).__init__(opt)
        self.jpeger = DiffJPEG(differentiable=False).to(self.device)  # simulates JPEG compression artefacts
        self.usm_sharpener = USMSharp().to(self.device)
        self.queue_size = opt.get('queue_size', 180)

    __init__.__qualname__ = f'{model_cls.__name__}.__init__'
    return __init__


def pool_on_device(dequeue_and_enqueue):
    """Wrap BasicSR's ``_dequeue_and_enqueue`` (the Real-ESRGAN training-pair pool) to allocate the pool
    on the batch's device: BasicSR allocates it with ``.cuda()`` on first use. Once the pool exists, BasicSR's
    method runs unchanged."""
    import functools

    @functools.wraps(dequeue_and_enqueue)
    def wrapper(self) -> None:
        if not hasattr(self, 'queue_lr'):
            b = self.lq.size(0)
            if self.queue_size % b:
                raise OptionError(f'queue_size {self.queue_size} is not a multiple of the batch size {b}')
            self.queue_lr = self.lq.new_zeros(self.queue_size, *self.lq.shape[1:])
            self.queue_gt = self.gt.new_zeros(self.queue_size, *self.gt.shape[1:])
            self.queue_ptr = 0
        return dequeue_and_enqueue(self)

    return wrapper


def contiguous_filter2d(filter2d):
    """Wrap BasicSR's ``filter2D`` (the blur / sinc filtering of Real-ESRGAN's degradations) to take tensors in
    any memory layout. It reshapes its input with ``.view()``, which fails for the channels-last strides that
    ``DiffJPEG``'s output has and that PyTorch's CPU ``interpolate`` / reflection padding keep; a contiguous
    copy gives the same values (``.contiguous()`` is free for tensors that already are)."""
    import functools

    @functools.wraps(filter2d)
    def wrapper(img, kernel):
        return filter2d(img.contiguous(), kernel)

    return wrapper


_PATCHED = False


def patch_basicsr() -> None:
    """Install the pieces above into BasicSR's pipeline (idempotent): option reading, distributed init and
    DDP without GPUs, a resume that needs no GPU, and Real-ESRGAN's degradation models (``RealESRNetModel``,
    ``RealESRGANModel``) without GPUs (device of their tools and pool, the layout of their filter's input),
    option parsing that never runs code, and a log file that fails once.
    Called when the package is imported."""
    global _PATCHED
    if _PATCHED:
        return
    import basicsr.models.realesrgan_model as realesrgan_model
    import basicsr.models.realesrnet_model as realesrnet_model
    import basicsr.test
    import basicsr.train
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options as options
    from basicsr.models.base_model import BaseModel

    dist_util.init_dist = init_dist
    options.init_dist = init_dist
    # BasicSR's pipelines bound the name at import: replace it where they look it up
    for module in (options, basicsr.train, basicsr.test):
        module.parse_options = parse_options
    basicsr.train.get_root_logger = get_root_logger
    BaseModel.model_to_device = model_to_device
    basicsr.train.load_resume_state = load_resume_state
    for module, model_cls in ((realesrnet_model, realesrnet_model.RealESRNetModel),
                              (realesrgan_model, realesrgan_model.RealESRGANModel)):
        model_cls.__init__ = real_esrgan_init(model_cls)
        model_cls._dequeue_and_enqueue = pool_on_device(model_cls._dequeue_and_enqueue)
        module.filter2D = contiguous_filter2d(module.filter2D)
    _PATCHED = True
