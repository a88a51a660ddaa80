"""Option files: reading, ``--force_yml`` overrides and the checks made before anything is written.

Used by the commands (``mambair-train`` / ``mambair-test`` / ``mambair-restore --opt``) and the Python API
(``load_model(opt=...)``). Every problem is an :class:`~basicsr_mambair.errors.OptionError` whose message
names the file and key.
"""

from __future__ import annotations

import os.path as osp
from collections.abc import Sequence

from .errors import OptionError

__all__ = ['OptionError', 'apply_overrides', 'check_options', 'read_option_file']


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
