"""Option files: reading, ``--force_yml`` overrides and the checks made before anything is written.

Used by the commands (``mambair-train`` / ``mambair-test`` / ``mambair-restore --opt``) and the Python API
(``load_model(opt=...)``). Every problem is an :class:`~basicsr_mambair.errors.OptionError` whose message
names the file and key.
"""

from __future__ import annotations

import os.path as osp
import re
from collections.abc import Sequence

import yaml

from .errors import OptionError

__all__ = ['OptionError', 'apply_overrides', 'check_options', 'parse_value', 'parse_yaml', 'read_option_file']


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
    """Apply ``--force_yml key:sub=value`` entries as BasicSR will, so checks see the final options.

    Values are parsed by :func:`parse_value` (YAML, never ``eval``); only existing keys can be updated.
    """
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
        node[last] = parse_value(value, entry)
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
