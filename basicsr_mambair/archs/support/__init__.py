"""Everything the package knows about an architecture family, in one module per family (spandrel's pattern).

A family module (``mambair.py``, ``mambairunet.py``, ...) defines ``FAMILY = ArchFamily(...)`` (or ``FAMILIES``, a
tuple, for archs that share one module, as ``mambairv2.py``):

- ``detect(state_dict) -> bool``: the key names are this family's;
- ``infer(state_dict) -> kwargs``: every parameter-shaping constructor argument, from key names and shapes;
- ``untraced``: the arguments that leave no trace in the weights, with the value a loaded network gets;
- ``describe(kwargs) -> ArchInfo``: scale, channels, purpose, activation memory, size multiple, fp16/bf16.

``load_model``, ``mambair-restore``, the tile planner and the checkpoint checks ask these functions; nothing
else branches on an arch's name. State dicts are as :func:`basicsr_mambair.utils.checkpoint.read_state_dict`
returns them (no ``module.`` prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...errors import CheckpointError
from . import mambair, mambairunet, mambairv2
from .base import ArchFamily, ArchInfo, constructor_defaults

__all__ = ['ArchFamily', 'ArchInfo', 'FAMILIES', 'constructor_defaults', 'describe', 'detect_arch_type', 'family',
           'infer_config']

_MAX_LISTED = 5

FAMILIES: dict[str, ArchFamily] = {f.arch_type: f for f in (mambair.FAMILY, mambairunet.FAMILY, *mambairv2.FAMILIES)}


def family(arch_type: str) -> ArchFamily:
    """The family registered as ``arch_type``; ``KeyError`` naming the known ones otherwise."""
    try:
        return FAMILIES[arch_type]
    except KeyError:
        raise KeyError(f'no support module for arch {arch_type!r} (known: {", ".join(FAMILIES)})') from None


def detect_arch_type(state_dict: Mapping[str, Any]) -> str:
    """The arch type whose key names ``state_dict`` has; :class:`CheckpointError` for none."""
    for name, fam in FAMILIES.items():
        if fam.detect(state_dict):
            return name
    shown = ', '.join(list(state_dict)[:_MAX_LISTED]) or '(empty)'
    raise CheckpointError(f'not a MambaIR-family state dict (first keys: {shown})')


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """(arch type, parameter-shaping constructor arguments) of a state dict, from key names and shapes.

    Arguments that leave no trace in the weights (``img_range``, ``drop_path_rate``, ...) are not returned;
    see each family's ``untraced``. Raises :class:`CheckpointError` naming the inconsistent keys.
    """
    arch_type = detect_arch_type(state_dict)
    try:
        return arch_type, FAMILIES[arch_type].infer(state_dict)
    except CheckpointError as exc:
        raise CheckpointError(f'cannot infer the {arch_type} config: {exc}') from None


def describe(arch_type: str, kwargs: Mapping[str, Any]) -> ArchInfo:
    """:class:`ArchInfo` of the network ``ARCH_REGISTRY.get(arch_type)(**kwargs)``."""
    return family(arch_type).describe(kwargs)
