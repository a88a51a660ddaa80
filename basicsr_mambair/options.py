"""Option files: reading, ``--force_yml`` overrides and the checks made before anything is written.

Used by the commands (``mambair-train`` / ``mambair-test`` / ``mambair-restore --opt``) and the Python API
(``load_model(opt=...)``). Every problem is an :class:`~basicsr_mambair.errors.OptionError` whose message
names the file and key.
"""

from __future__ import annotations

import os.path as osp
from collections.abc import Sequence

from .errors import OptionError

__all__ = ['OptionError', 'apply_overrides', 'check_options', 'missing_vgg_weights', 'needs_ground_truth',
           'read_option_file']


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


def registered(registry, name: str | None) -> bool:
    """Whether BasicSR's ``registry.get(name)`` finds something: ``name`` itself, or ``name + '_basicsr'`` (the
    name BasicSR gives its own classes registered with ``suffix='basicsr'``, e.g. ``RealESRGANDataset``)."""
    return isinstance(name, str) and (name in registry or f'{name}_basicsr' in registry)


def needs_ground_truth(metric_type: str) -> bool:
    """Whether BasicSR's metric ``metric_type`` compares with a reference image (it takes ``img2``: PSNR, SSIM)
    or scores the output alone (NIQE)."""
    import inspect

    from basicsr.utils.registry import METRIC_REGISTRY

    if not registered(METRIC_REGISTRY, metric_type):
        known = ', '.join(sorted(METRIC_REGISTRY._obj_map))
        raise OptionError(f"unknown metric type '{metric_type}' (registered: {known})")
    return 'img2' in inspect.signature(METRIC_REGISTRY.get(metric_type)).parameters


def missing_vgg_weights(vgg_type: str = 'vgg19') -> str | None:
    """None when BasicSR's ``VGGFeatureExtractor(vgg_type)`` (the perceptual loss) finds its ImageNet weights
    on disk, else one line saying where to put them.

    BasicSR reads ``experiments/pretrained_models/vgg19-dcbb9e9d.pth`` (its ``VGG_PRETRAIN_PATH``, relative to
    the working directory, loaded whatever ``vgg_type`` is) or else asks torchvision, which downloads the file
    into the torch hub cache when it is not there. Refusing before that keeps a run from stalling or failing
    deep in model construction on a machine without internet access.
    """
    import torch
    from basicsr.archs.vgg_arch import VGG_PRETRAIN_PATH
    from torchvision.models import get_model_weights

    if osp.isfile(VGG_PRETRAIN_PATH):
        if vgg_type == 'vgg19':
            return None
        return (f'BasicSR would load the vgg19 weights of {VGG_PRETRAIN_PATH} into a {vgg_type}: move that file '
                f'away or use vgg_type vgg19')
    try:
        url = get_model_weights(vgg_type).IMAGENET1K_V1.url
    except (ValueError, AttributeError):
        return f"unknown vgg_type '{vgg_type}' (torchvision has no ImageNet weights of that name)"
    name = osp.basename(url)
    cached = osp.join(torch.hub.get_dir(), 'checkpoints', name)
    if osp.isfile(cached):
        return None
    local = f' or {VGG_PRETRAIN_PATH}' if vgg_type == 'vgg19' else ''
    return (f'the {vgg_type} ImageNet weights are not on this machine and are not downloaded automatically: put '
            f'{name} ({url}) at {cached} (the torch hub cache; TORCH_HOME moves it){local}')


def check_options(opt: dict, path: str, is_train: bool) -> None:
    """Catch the usual mistakes before BasicSR creates folders or builds anything."""
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

    for key in ('name', 'model_type', 'datasets', 'path'):
        if key not in opt:
            raise OptionError(f"{path}: missing top-level key '{key}'")
    if not registered(MODEL_REGISTRY, opt['model_type']):
        raise OptionError(f"{path}: unknown model_type '{opt['model_type']}' "
                          f'(registered: {", ".join(sorted(MODEL_REGISTRY._obj_map))})')
    for key, net_opt in opt.items():
        if key.startswith('network_'):
            arch = (net_opt or {}).get('type')
            if not registered(ARCH_REGISTRY, arch):
                raise OptionError(f"{path}: unknown arch type '{arch}' in {key} "
                                  f'(registered: {", ".join(sorted(ARCH_REGISTRY._obj_map))})')
    if not isinstance(opt['datasets'], dict) or not opt['datasets']:
        raise OptionError(f"{path}: 'datasets' must map phases (train, val, test_1, ...) to datasets")
    for phase, ds in opt['datasets'].items():
        if not registered(DATASET_REGISTRY, ds.get('type')):
            raise OptionError(f"{path}: unknown dataset type '{ds.get('type')}' in datasets:{phase}")
        backend = (ds.get('io_backend') or {}).get('type', 'disk')
        for root_key in ('dataroot_gt', 'dataroot_lq', 'meta_info_file', 'meta_info'):
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
    _check_metrics(opt, path)
    if is_train:
        _check_real_esrgan(opt, path)


def _check_metrics(opt: dict, path: str) -> None:
    """Metric types exist; a full-reference metric needs test/val datasets with ground truth."""
    metrics = (opt.get('val') or {}).get('metrics') or {}
    for name, metric_opt in metrics.items():
        try:
            full_reference = needs_ground_truth((metric_opt or {}).get('type'))
        except OptionError as e:
            raise OptionError(f'{path}: val:metrics:{name}: {e}') from None
        if not full_reference:
            continue
        for phase, ds in opt['datasets'].items():
            if phase != 'train' and ds.get('dataroot_gt') is None:
                raise OptionError(f"{path}: val:metrics:{name} ({metric_opt['type']}) compares with ground truth, "
                                  f'but datasets:{phase} has none (no dataroot_gt): remove the metric or use a '
                                  'no-reference one such as calculate_niqe')


def _check_real_esrgan(opt: dict, path: str) -> None:
    """What BasicSR's Real-ESRGAN models would only find out late: the training-pair pool must hold whole
    batches, and a perceptual loss needs VGG weights that must not be downloaded mid-construction."""
    batch = (opt['datasets'].get('train') or {}).get('batch_size_per_gpu')
    queue = opt.get('queue_size')
    if queue is not None and batch and int(queue) % int(batch):
        raise OptionError(f'{path}: queue_size {queue} is not a multiple of datasets:train:batch_size_per_gpu '
                          f'{batch} (the training-pair pool holds whole batches)')
    for key, loss_opt in (opt.get('train') or {}).items():
        if isinstance(loss_opt, dict) and loss_opt.get('type') == 'PerceptualLoss':
            problem = missing_vgg_weights(loss_opt.get('vgg_type', 'vgg19'))
            if problem:
                raise OptionError(f'{path}: train:{key} (PerceptualLoss): {problem}')
