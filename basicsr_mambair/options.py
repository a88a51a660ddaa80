"""Option files: reading, ``--force_yml`` overrides and the checks made before anything is written.

Used by the commands (``mambair-train`` / ``mambair-test`` / ``mambair-restore --opt``), BasicSR's pipelines
(:func:`basicsr_mambair.compat.parse_options` reads through :func:`load_options`) and the Python API
(``load_model(opt=...)``). Every problem is an :class:`~basicsr_mambair.errors.OptionError` whose message
names the file and key.
"""

from __future__ import annotations

import os
import os.path as osp
import re
from collections.abc import Sequence

import yaml

from .dialect import fit_num_gpu, translate
from .errors import OptionError

__all__ = ['OptionError', 'apply_overrides', 'check_options', 'compile_options', 'load_options',
           'missing_vgg_weights', 'needs_ground_truth', 'parse_value', 'parse_yaml', 'read_option_file']

# Keys that --force_yml may add to a file that lacks them (section path -> keys; '*' = any dataset phase):
# the optional options our models, datasets and BasicSR read. Anything else must exist already, so that a
# typo is refused instead of silently ignored. network_g also takes any constructor argument of its arch.
OPTIONAL_KEYS: dict[tuple[str, ...], frozenset[str]] = {
    (): frozenset({'num_gpu', 'manual_seed', 'find_unused_parameters'}),
    ('val',): frozenset({'tile', 'tile_mode', 'tile_overlap', 'tile_batch', 'self_ensemble', 'window_size',
                         'save_img', 'suffix', 'pbar', 'val_freq'}),
    ('path',): frozenset({'pretrain_network_g', 'strict_load_g', 'param_key_g', 'resume_state'}),
    ('train',): frozenset({'ema_decay', 'use_grad_clip', 'warmup_iter'}),
    ('logger',): frozenset({'print_freq', 'save_checkpoint_freq', 'use_tb_logger'}),
    ('datasets', '*'): frozenset({'val_noise_seed', 'noise', 'quality', 'gray', 'meta_info_file', 'filename_tmpl',
                                  'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio',
                                  'use_hflip', 'use_rot', 'use_shuffle', 'prefetch_mode'}),
}
TILE_MODES = ('official', 'blend')



class _OptionLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no tag constructs a Python object) with BasicSR's types.

    BasicSR reads option files with ``yaml.Loader``, which runs ``!!python/object/apply:...`` tags. This
    loader builds dicts (insertion-ordered, as BasicSR's ``OrderedDict``), lists, numbers, booleans and
    ``None``; unlike YAML 1.1 it reads ``1e-3`` as a float (what option files mean by it) and leaves dates as
    text (experiment names like ``2024-05-01`` stay strings).
    """


_OptionLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != 'tag:yaml.org,2002:timestamp']
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_OptionLoader.add_implicit_resolver(  # exponent without a dot or sign: 1e-3, 2E5, -5e+2
    'tag:yaml.org,2002:float', re.compile(r'^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$'),
    list('-+0123456789'))


def _yaml_error(exc: yaml.YAMLError, where: str) -> OptionError:
    """One line for a YAML problem; a tag that would construct an object is named as such."""
    mark = getattr(exc, 'problem_mark', None)
    at = f' (line {mark.line + 1})' if mark is not None else ''
    if isinstance(exc, yaml.constructor.ConstructorError) and 'tag' in str(exc.problem):
        tag = re.search(r"tag '([^']*)'", str(exc.problem))
        tag = tag.group(1).replace('tag:yaml.org,2002:', '!!') if tag else 'a tag'
        return OptionError(f'{where}{at}: refusing the YAML tag {tag}: option files hold plain values '
                           '(numbers, text, lists, mappings); tags that construct Python objects are not run')
    return OptionError(f'{where} is not valid YAML{at}: {" ".join(str(exc).split())}')


def parse_yaml(text: str, where: str):
    """``text`` parsed with the safe option loader; :class:`OptionError` naming ``where`` on any problem."""
    try:
        return yaml.load(text, Loader=_OptionLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, where) from None


def read_option_file(path: str) -> dict:
    """Parse an option file safely (no YAML tag runs code), keeping key order and BasicSR's value types."""
    if not osp.isfile(path):
        raise OptionError(f'option file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f'cannot read option file {path}: {exc}') from None
    opt = parse_yaml(text, path)
    if not isinstance(opt, dict):
        raise OptionError(f'{path} does not hold a mapping of options')
    return opt


_WORDS = {'~': None, 'none': None, 'null': None, 'true': True, 'false': False}
_NUMBER = re.compile(r'[-+]?(?:(?P<int>[0-9]+)|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)')


def load_options(path: str, overrides: Sequence[str] | None = None) -> dict:
    """An option file as the pipelines use it: read, ``--force_yml`` applied (to the keys as written), the
    official dialect mapped (:func:`basicsr_mambair.dialect.translate`), ``num_gpu`` fitted to the GPUs here."""
    opt = apply_overrides(read_option_file(path), overrides)
    return fit_num_gpu(translate(opt, path), path)


def _creatable(opt: dict, parents: Sequence[str], key: str) -> bool:
    """Whether --force_yml may add ``key`` under ``parents`` (see OPTIONAL_KEYS)."""
    section = tuple(parents)
    if section in OPTIONAL_KEYS and key in OPTIONAL_KEYS[section]:
        return True
    if len(section) == 2 and section[0] == 'datasets' and key in OPTIONAL_KEYS[('datasets', '*')]:
        return True
    if section == ('network_g',) and isinstance(opt.get('network_g'), dict):
        from basicsr.utils.registry import ARCH_REGISTRY

        from .archs.support import constructor_defaults

        arch = opt['network_g'].get('type')
        return arch in ARCH_REGISTRY and key in constructor_defaults(arch)
    return False


def parse_value(text: str, entry: str = ''):
    """A ``--force_yml`` value as BasicSR means it, without its ``eval``: ``~``/``none`` -> None,
    ``true``/``false`` -> bool, numbers (``-1``, ``2e-4`` too) -> int/float, ``[...]`` lists, ``{...}``
    mappings and ``!!float ...`` parsed with the safe YAML loader; anything else stays text."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    number = _NUMBER.fullmatch(text)
    if number:
        return int(text) if number.group('int') else float(text)
    if text.startswith(('[', '{', '!')):
        return parse_yaml(text, f'--force_yml {entry or text}')
    return text


def apply_overrides(opt: dict, entries: Sequence[str] | None) -> dict:
    """Apply ``--force_yml key:sub=value`` entries: existing keys, or optional keys the file leaves out
    (``val:tile_mode``, ``path:param_key_g``, a constructor argument of ``network_g``, ...).

    Values are parsed by :func:`parse_value` (YAML, never ``eval``).
    """
    for entry in entries or ():
        if '=' not in entry:
            raise OptionError(f"--force_yml entries look like key:sub=value, got '{entry}'")
        keys, value = (part.strip() for part in entry.split('=', 1))
        node = opt
        *parents, last = keys.split(':')
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise OptionError(f"--force_yml {entry}: no option '{key}' to update (new sections cannot be "
                                  'created)')
            node = node[key]
        if last not in node and not _creatable(opt, parents, last):
            raise OptionError(f"--force_yml {entry}: no option '{last}' to update (only options the file has or "
                              'known optional ones can be set; check the spelling)')
        node[last] = parse_value(value, entry)
    return opt


def _kind(ds: dict) -> str | None:
    """The dataset type that reads the images (the base type of a MultiRootDataset)."""
    return ds.get('base_type') if ds.get('type') == 'MultiRootDataset' else ds.get('type')


def _channels(ds: dict) -> int | None:
    """Channels of the images a dataset of ours or BasicSR's paired one yields (None: unknown type)."""
    kind = _kind(ds)
    if kind == 'GaussianNoiseDataset':
        return 1 if ds.get('gray') else 3
    if kind == 'JPEGArtifactDataset':
        return 1 if ds.get('gray', True) else 3
    if kind == 'PairedImageDataset':
        return 1 if ds.get('color') == 'y' else 3
    return None


def _files(folder: str) -> list[str]:
    """File names BasicSR's folder scan pairs (non-hidden files directly inside ``folder``)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith('.'))


def _check_pairs(ds: dict, roots: dict, where: str) -> None:
    """Every GT image of a paired folder dataset has its LQ file, named as the dataset will look for it."""
    from .data.util import lq_name
    from .image_io import is_image_file

    kind = _kind(ds)
    if kind not in ('PairedImageDataset', 'JPEGArtifactDataset') or not roots.get('dataroot_lq'):
        return
    if (ds.get('io_backend') or {}).get('type', 'disk') != 'disk' or ds.get('meta_info_file'):
        return
    gt_root, lq_root = (osp.expanduser(roots[key]) for key in ('dataroot_gt', 'dataroot_lq'))
    for key, root in (('dataroot_gt', gt_root), ('dataroot_lq', lq_root)):
        if not osp.isdir(root):
            raise OptionError(f'{where}:{key} must be a folder of images (io_backend disk), got the file {root}')
    tmpl = ds.get('filename_tmpl', '{}')
    gt_names, lq_names = _files(gt_root), set(_files(lq_root))
    if kind == 'JPEGArtifactDataset':
        gt_names = [name for name in gt_names if is_image_file(name)]
        ext, rule = ds.get('lq_ext', '.jpg'), f"LQ files are named <GT name>{ds.get('lq_ext', '.jpg')}"
        fix = 'make them with mambair-make-jpeg'
    else:
        ext, rule = None, 'LQ files are named as filename_tmpl of the GT name, with its extension'
        fix = f"filename_tmpl is '{tmpl}'"
        if len(gt_names) != len(lq_names):
            raise OptionError(f'{where}: dataroot_gt has {len(gt_names)} files but dataroot_lq {len(lq_names)} '
                              f'({gt_root}, {lq_root}); PairedImageDataset pairs every file, remove the extra ones')
    missing = [(gt, lq) for gt in gt_names if (lq := lq_name(gt, tmpl, ext)) not in lq_names]
    if missing:
        gt, lq = missing[0]
        raise OptionError(f'{where}:dataroot_lq: {len(missing)} of {len(gt_names)} LQ images missing in {lq_root}, '
                          f'e.g. {lq} for {gt} ({rule}; {fix})')


def _check_dataset(ds: dict, where: str) -> None:
    from basicsr.utils.registry import DATASET_REGISTRY

    if not registered(DATASET_REGISTRY, ds.get('type')):
        raise OptionError(f"unknown dataset type '{ds.get('type')}' in {where}")
    for key in ('name', 'filename_tmpl', 'meta_info_file', 'dataroot_gt', 'dataroot_lq'):
        if ds.get(key) is not None and not isinstance(ds[key], str):
            raise OptionError(f'{where}:{key} must be a string, got {type(ds[key]).__name__} {ds[key]!r}')
    backend = (ds.get('io_backend') or {}).get('type', 'disk')
    parts = ds.get('roots') if ds.get('type') == 'MultiRootDataset' else [ds]
    for roots in parts:
        for root_key in ('dataroot_gt', 'dataroot_lq', 'meta_info_file', 'meta_info'):
            if roots.get(root_key) is None:
                continue
            root = osp.expanduser(str(roots[root_key]))
            if backend != 'disk' and root_key != 'meta_info_file':
                ok = osp.isdir(root) or osp.isfile(root)
            else:
                ok = osp.exists(root)
            if not ok:
                raise OptionError(f'{where}:{root_key} not found: {root} '
                                  f'(see datasets/README.md for how to prepare it)')
        _check_pairs(ds, roots, where)


def _network_channels(net_opt: dict) -> int | None:
    from basicsr.utils.registry import ARCH_REGISTRY

    from .archs.support import constructor_defaults

    if net_opt.get('type') not in ARCH_REGISTRY:  # unknown, or one of BasicSR's own (no MambaIR input channels)
        return None
    args = {**constructor_defaults(net_opt['type']), **net_opt}
    chans = args.get('in_chans', args.get('inp_channels'))
    return chans if isinstance(chans, int) and not isinstance(chans, bool) else None


def _check_val(val: dict) -> None:
    """The test-time tiling options of MambaIRModel."""
    mode = val.get('tile_mode')
    if mode is not None and mode not in TILE_MODES:
        raise OptionError(f"val:tile_mode must be one of {', '.join(TILE_MODES)}, got {mode!r}")
    for key, least, meaning in (('tile', 0, 'tile side in LQ pixels, 0 = whole image'),
                                ('tile_overlap', 0, 'LQ pixels shared by neighbouring tiles'),
                                ('tile_batch', 1, 'tiles per forward')):
        value = val.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise OptionError(f'val:{key} must be an integer >= {least} ({meaning}), got {value!r}')


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
    """Catch the usual mistakes before BasicSR creates folders or builds anything (options as
    :func:`load_options` returns them)."""
    from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY

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
    in_chans = _network_channels(opt['network_g']) if isinstance(opt.get('network_g'), dict) else None
    for phase, ds in opt['datasets'].items():
        if not isinstance(ds, dict):
            raise OptionError(f'{path}: datasets:{phase} must be a mapping of dataset options')
        _check_dataset(ds, f'datasets:{phase}')
        channels = _channels(ds)
        if in_chans is not None and channels is not None and channels != in_chans:
            raise OptionError(f'network_g:in_chans is {in_chans} but datasets:{phase} ({_kind(ds)}) gives '
                              f'{channels}-channel images; make them agree (grayscale data: in_chans 1)')
    paths = opt.get('path') or {}
    for key, value in paths.items():
        if ('pretrain_network' in key or key == 'resume_state') and value is not None and not isinstance(value, str):
            raise OptionError(f'path:{key} must be a file path (a string), got {type(value).__name__} {value!r}')
        if key.startswith('pretrain_network') and value is not None and not osp.isfile(osp.expanduser(value)):
            raise OptionError(f'path:{key} not found: {value} (see experiments/pretrained_models/README.md)')
    _check_val(opt.get('val') or {})
    if is_train and 'train' not in opt:
        raise OptionError(f"{path}: missing top-level key 'train' (losses, optimizer, total_iter)")
    _check_speed_options(opt, path, is_train)
    _check_metrics(opt, path)
    if is_train:
        _check_real_esrgan(opt, path)


def compile_options(value) -> dict | None:
    """``torch.compile`` keyword arguments of a ``network_g:compile`` value (None: not compiled)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f'network_g:compile must be true, false or a mapping of torch.compile arguments, not {value!r}')


def _check_speed_options(opt: dict, path: str, is_train: bool) -> None:
    """``train:use_amp`` and ``network_g:compile`` (ours, unknown to BasicSR) fit this machine."""
    import torch

    from .utils.amp import amp_dtype

    try:
        compile_options((opt.get('network_g') or {}).get('compile'))
        if is_train and (opt.get('train') or {}).get('use_amp') is not None:
            device = 'cuda' if torch.cuda.is_available() and opt.get('num_gpu', 'auto') != 0 else 'cpu'
            amp_dtype(opt['train']['use_amp'], device)
    except ValueError as exc:
        raise OptionError(f'{path}: {exc}') from None


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
            if phase != 'train' and ds.get('dataroot_gt') is None and not ds.get('roots'):
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
