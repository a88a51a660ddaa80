"""The pieces every family support module uses: :class:`ArchInfo`, :class:`ArchFamily` and shape readers."""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import CheckpointError


@dataclass(frozen=True)
class ArchInfo:
    """What callers need to know about a network built from given constructor arguments.

    Attributes:
        arch_type: the registered arch (``network_g.type``).
        scale: output size / input size.
        in_channels / out_channels: image channels taken / given.
        purpose: ``'SR'`` (super-resolution) or ``'Restoration'`` (denoising, JPEG artefacts), as spandrel names them.
        bytes_per_pixel: estimated peak activation memory of a float32 eval forward per LQ pixel (bytes; an upper
            bound, calibrated by ``benchmarks/bench_memory.py``).
        scan_bytes_per_pixel: the same where the selective scans run the fused CPU kernel
            (:func:`basicsr_mambair.ops.scan.uses_fused_kernel`), which copies no scan direction; None: no
            difference.
        size_multiple: input sides that are multiples of this need no padding inside the network (other sizes
            are padded there and cropped back: any size works); tiles are chosen as multiples of it.
        fp16 / bf16: half / bfloat16 inference is safe (the selective scan always runs in float32).
    """

    arch_type: str
    scale: int
    in_channels: int
    out_channels: int
    purpose: str
    bytes_per_pixel: int
    size_multiple: int = 1
    scan_bytes_per_pixel: int | None = None
    fp16: bool = True
    bf16: bool = True


@dataclass(frozen=True)
class ArchFamily:
    """One architecture family: how to recognise, configure and describe it (see the module docstring)."""

    arch_type: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    infer: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]]
    describe: Callable[[Mapping[str, Any]], ArchInfo]
    untraced: dict[str, Any] = field(default_factory=dict)


def constructor_defaults(arch_type: str) -> dict[str, Any]:
    """Constructor defaults of a registered arch, tuples as lists (as option files and :func:`infer_config`)."""
    from basicsr.utils.registry import ARCH_REGISTRY  # after `import basicsr_mambair` (torchvision alias)

    params = inspect.signature(ARCH_REGISTRY.get(arch_type)).parameters.values()
    return {p.name: list(p.default) if isinstance(p.default, tuple) else p.default
            for p in params if p.default is not inspect.Parameter.empty}


def shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of ``state_dict[key]``; :class:`CheckpointError` when the key is missing."""
    if key not in state_dict:
        raise CheckpointError(f'key {key!r} is missing')
    return tuple(state_dict[key].shape)


def expansion_ratio(d_inner: int, width: int) -> float:
    """The simplest ratio r (fewest decimals) with ``int(r * width) == d_inner``, as SS2D computes its width."""
    for digits in range(7):
        ratio = round(d_inner / width, digits)
        if int(ratio * width) == d_inner:
            return float(ratio)
    return (d_inner + 0.5) / width


def block_indices(state_dict: Mapping[str, Any], pattern: str) -> dict[int, set[int]]:
    """{outer index: {inner indices}} of keys matching ``pattern`` with two groups (or {0: {...}} for one)."""
    found: dict[int, set[int]] = defaultdict(set)
    regex = re.compile(pattern)
    for key in state_dict:
        match = regex.match(key)
        if match:
            groups = [int(g) for g in match.groups()]
            outer, inner = (0, groups[0]) if len(groups) == 1 else groups
            found[outer].add(inner)
    return found


def count(indices: set[int], what: str) -> int:
    """``len(indices)`` after checking they are 0..n-1 (a gap means a damaged or foreign state dict)."""
    if indices != set(range(len(indices))):
        raise CheckpointError(f'{what}: block indices {sorted(indices)} are not 0..n-1')
    return len(indices)
