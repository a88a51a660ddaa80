"""The official MambaIR option dialect, read faithfully (spec section 4).

The official repository runs its option files on a modified BasicSR: its ``PairedImageDataset`` reads the
extension keys ``task`` (``SR`` | ``denoising_color`` | ``denoising_gray`` | ``CAR``) and ``noise``, accepts lists
of data roots and forces ``.jpg`` LQ names for CAR; its ``realDenoising/`` folder is Restormer's fork
(``ImageCleanModel``, ``Dataset_PairedImage``, ``geometric_augs``). Stock BasicSR ignores those keys (no noise is
added) or fails on them. :func:`translate` maps every such dataset and model onto what this package registers,
so that an official file means what it meant officially, and says so in one line:

==============================================  =========================================================
official                                         here
==============================================  =========================================================
``PairedImageDataset``, ``task: SR`` or none     ``PairedImageDataset``
``task: denoising_color`` / ``_gray``, ``noise``  ``GaussianNoiseDataset`` (validation noise = official)
``task: CAR``                                    ``JPEGArtifactDataset`` (gray, LQ ``<name>.jpg``)
lists in ``dataroot_gt`` / ``dataroot_lq``        ``MultiRootDataset`` over the base type, one per root
``Dataset_PairedImage``, ``geometric_augs``       ``PairedImageDataset``, ``use_hflip`` + ``use_rot``
``ImageCleanModel``, ``path:param_key``          ``RealDenoisingModel``, ``path:param_key_g``
==============================================  =========================================================

Keys the official code reads nowhere (``val:selfensemble_testing``, ``val:patchwise_testing``) stay and have no
effect, as officially. :func:`fit_num_gpu` lets ``num_gpu: 8`` run on the GPUs that are there.
"""

from __future__ import annotations

import os
import sys

from .errors import OptionError

__all__ = ['fit_num_gpu', 'say_once', 'translate']

OFFICIAL_TASKS = ('SR', 'denoising_color', 'denoising_gray', 'CAR')
# dataset types that work on one root each and so accept lists of roots (through MultiRootDataset)
LIST_TYPES = ('PairedImageDataset', 'GaussianNoiseDataset', 'JPEGArtifactDataset')
ROOT_KEYS = ('dataroot_gt', 'dataroot_lq')
# Restormer's ImageCleanModel validation keys that BasicSR's (8-bit image metrics) has no use for
IMAGE_CLEAN_VAL_KEYS = ('rgb2bgr', 'use_image', 'max_minibatch')

_SAID: set[str] = set()


def say_once(line: str) -> None:
    """Print ``line`` on stderr once per process, from the first process of a distributed run only
    (the option file is read by the command's check and again by the pipeline, and by every rank)."""
    if line in _SAID or os.environ.get('RANK', '0') != '0':
        return
    _SAID.add(line)
    print(line, file=sys.stderr, flush=True)


def _as_roots(ds: dict, where: str) -> list[dict] | None:
    """The per-root dicts of a dataset with list-valued roots (None: no lists); checks their shape."""
    lists = {key: ds[key] for key in ROOT_KEYS if isinstance(ds.get(key), (list, tuple))}
    if not lists:
        return None
    present = [key for key in ROOT_KEYS if ds.get(key) is not None]
    lengths = {key: len(value) for key, value in lists.items()}
    if len(lists) != len(present) or len(set(lengths.values())) != 1:
        described = ', '.join(f'{key} is a list of {lengths[key]}' if key in lists else f'{key} is one folder'
                              for key in present)
        raise OptionError(f'{where}: {described}; give {" and ".join(present)} as lists of the same length '
                          f'(folder i of one pairs with folder i of the other)')
    for key, value in lists.items():
        bad = [root for root in value if not isinstance(root, str)]
        if bad or not value:
            raise OptionError(f'{where}:{key} must list folder paths (strings), got {value!r}')
    if (ds.get('io_backend') or {}).get('type', 'disk') != 'disk' or ds.get('meta_info_file'):
        raise OptionError(f'{where}:{present[0]}: lists of data roots work with folders (io_backend: disk, no '
                          f'meta_info_file); give one root')
    return [{key: lists[key][i] for key in lists} for i in range(len(next(iter(lists.values()))))]


def _official_task(ds: dict, where: str, notes: list[str]) -> None:
    """``PairedImageDataset`` with the official ``task`` / ``noise`` keys -> the dataset that does that task."""
    task = ds.pop('task', None)
    noise = ds.get('noise')
    if task is None or task == 'SR':
        ds.pop('noise', None)  # read by the denoising tasks only, officially
        return
    if task not in OFFICIAL_TASKS:
        raise OptionError(f"{where}:task: unknown task '{task}' (the official tasks: {', '.join(OFFICIAL_TASKS)})")
    for key in ('mean', 'std', 'color'):
        if key in ds:
            raise OptionError(f"{where}:{key} is not supported with task: {task}; remove it")
    if task.startswith('denoising'):
        if noise is None:
            raise OptionError(f'{where}: task: {task} needs noise: <sigma on the 0-255 scale> (officially absent '
                              f'means 0, no noise at all); add e.g. noise: 15')
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
            raise OptionError(f'{where}:noise must be a number >= 0 (sigma on the 0-255 scale), got {noise!r}')
        ds['type'] = 'GaussianNoiseDataset'
        ds['gray'] = task == 'denoising_gray'
        for key in ('dataroot_lq', 'filename_tmpl'):  # officially the LQ is the GT path (plus noise)
            ds.pop(key, None)
        notes.append(f'{where} task: {task} -> GaussianNoiseDataset (sigma {noise}, official validation noise)')
    else:
        ds.pop('noise', None)
        ds.update(type='JPEGArtifactDataset', gray=True, lq_ext='.jpg')
        notes.append(f'{where} task: CAR -> JPEGArtifactDataset (grayscale, LQ <name>.jpg)')


def _restormer_dataset(ds: dict, where: str, phase: str, notes: list[str]) -> None:
    """Restormer's ``Dataset_PairedImage`` -> BasicSR's ``PairedImageDataset`` with the same sampling."""
    ds['type'] = 'PairedImageDataset'
    augs = bool(ds.pop('geometric_augs', False))
    if phase == 'train':  # the 8 flips/rotations, uniformly, as BasicSR's hflip + rot (transpose, vflip)
        ds['use_hflip'] = ds['use_rot'] = augs
    notes.append(f'{where} Dataset_PairedImage -> PairedImageDataset' + (' (geometric_augs)' if augs else ''))
    sizes, batch = ds.get('mini_batch_sizes'), ds.get('batch_size_per_gpu')
    if isinstance(sizes, list) and isinstance(batch, int) and any(isinstance(b, int) and b > batch for b in sizes):
        # officially a stage only sub-samples the loaded batch: mini-batches above batch_size_per_gpu never happen
        ds['mini_batch_sizes'] = [min(b, batch) for b in sizes]
        notes.append(f'{where}:mini_batch_sizes {sizes} -> {ds["mini_batch_sizes"]} (batch_size_per_gpu {batch}, '
                     'as officially)')


def translate(opt: dict, source: str) -> dict:
    """Map the official dialect in ``opt`` (as read from ``source``) onto our types, in place; say what changed
    in one line. Raises :class:`OptionError` naming the key and the fix for what cannot mean anything."""
    notes: list[str] = []
    clean_model = opt.get('model_type') == 'ImageCleanModel'
    if clean_model:
        opt['model_type'] = 'RealDenoisingModel'
        notes.append('model_type ImageCleanModel -> RealDenoisingModel')
        path = opt.get('path')
        if isinstance(path, dict) and 'param_key' in path:
            path.setdefault('param_key_g', path.pop('param_key'))
        val = opt.get('val')
        if isinstance(val, dict) and any(key in val for key in IMAGE_CLEAN_VAL_KEYS):
            for key in IMAGE_CLEAN_VAL_KEYS:
                val.pop(key, None)
            notes.append(f'val:{"/".join(IMAGE_CLEAN_VAL_KEYS)} dropped (metrics on 8-bit images)')
    datasets = opt.get('datasets')
    for phase, ds in (datasets.items() if isinstance(datasets, dict) else ()):
        if not isinstance(ds, dict):
            continue
        where = f'datasets:{phase}'
        if ds.get('type') == 'Dataset_PairedImage':
            _restormer_dataset(ds, where, phase.split('_')[0], notes)
        if ds.get('type') == 'PairedImageDataset':
            _official_task(ds, where, notes)
        roots = _as_roots(ds, where)
        if roots is None:
            continue
        if ds.get('type') not in LIST_TYPES:
            raise OptionError(f"{where}:{next(k for k in ROOT_KEYS if isinstance(ds.get(k), (list, tuple)))}: "
                              f"a list of folders works with {', '.join(LIST_TYPES)}, not {ds.get('type')}; "
                              'give one folder')
        for key in ROOT_KEYS:
            ds.pop(key, None)
        if len(roots) == 1:
            ds.update(roots[0])
        else:
            ds.update(base_type=ds['type'], type='MultiRootDataset', roots=roots)
            notes.append(f'{where} {len(roots)} data roots concatenated ({ds["base_type"]} each)')
    if notes:
        say_once(f'basicsr-mambair: {source}: official option dialect: ' + '; '.join(notes))
    return opt


def fit_num_gpu(opt: dict, source: str) -> dict:
    """``num_gpu`` above the GPUs present (official files say 8) -> the GPUs present, with one warning line."""
    wanted = opt.get('num_gpu')
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted <= 0:
        return opt  # 'auto', 0 or a mistake the checks report
    import torch

    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted > present:
        opt['num_gpu'] = present
        here = f'{present} GPU' + ('s' if present > 1 else '') if present else 'the CPU'
        say_once(f'basicsr-mambair: warning: {source}: num_gpu: {wanted} but {present or "no"} GPUs here; '
                 f'running on {here} (num_gpu: auto uses what is there)')
    return opt
