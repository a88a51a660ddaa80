"""``MultiRootDataset``: one dataset over several data roots, as the official option files' lists of roots.

The official MambaIR code lets ``dataroot_gt`` / ``dataroot_lq`` be lists (DF2K = DIV2K + Flickr2K): its
``paired_paths_from_folder`` pairs GT folder i with LQ folder i and concatenates the pairs. BasicSR's datasets
take one folder each; this wraps any registered dataset type, one instance per root, in a
``torch.utils.data.ConcatDataset``. The option-file reader (:mod:`basicsr_mambair.dialect`) turns lists into
this type, so users keep writing lists.
"""

from __future__ import annotations

import copy
import os.path as osp

from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils.data import ConcatDataset


@DATASET_REGISTRY.register()
class MultiRootDataset(ConcatDataset):
    """The concatenation of ``base_type`` datasets, one per entry of ``roots``.

    Options (``datasets:<phase>``):
        base_type (str): a registered dataset type (e.g. ``PairedImageDataset``).
        roots (list[dict]): per part, its data-root keys, e.g. ``{dataroot_gt: ..., dataroot_lq: ...}``.
        every other key: options of ``base_type``, shared by all parts.

    Items are those of the parts, in order (part 0's images first).
    """

    def __init__(self, opt: dict):
        base = DATASET_REGISTRY.get(opt['base_type'])
        shared = {k: v for k, v in opt.items() if k not in ('type', 'base_type', 'roots')}
        parts = []
        for roots in opt['roots']:
            part_opt = copy.deepcopy(shared)  # BasicSR datasets pop from their io_backend dict: no sharing
            part_opt.update({key: osp.expanduser(str(root)) for key, root in roots.items()}, type=opt['base_type'])
            parts.append(base(part_opt))
        super().__init__(parts)
        self.opt = opt  # BasicSR reads dataset.opt['name'] (validation) and the phase options
