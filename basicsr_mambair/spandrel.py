"""spandrel (and so chaiNNer) support: every arch family of this package as a spandrel architecture.

::

    import basicsr_mambair.spandrel
    from spandrel import ModelLoader

    basicsr_mambair.spandrel.install()  # once: adds MambaIR, MambaIRUNet, ... to spandrel's MAIN_REGISTRY
    model = ModelLoader().load_from_file('MambaIR_lightSR_x4.pth')  # or .safetensors
    model.scale, model.purpose, model.tags  # 4, 'SR', ['lightSR_x4', 'embed_dim=60', ...]
    sr = model(lr)  # (1, 3, H, W) float in [0, 1] -> (1, 3, 4H, 4W), clamped to [0, 1]

One :class:`~spandrel.ArchSupport` per family of :data:`basicsr_mambair.archs.support.FAMILIES` (a family added
there is supported here without a change), built on that family's own detection, config inference and
description, so spandrel builds exactly the network ``load_model`` builds and gives its output:

* detection: the family's ``detect`` and a successful ``infer`` (which checks the shapes of every block), so
  no other architecture's file is claimed (SwinIR, HAT, DAT ... share MambaIR's top-level key names); our
  architectures are tried before spandrel's own for the same reason the other way round;
* ``scale``, channels, ``purpose`` (``'SR'`` / ``'Restoration'``), ``supports_half`` / ``supports_bfloat16``
  from the family's :class:`~basicsr_mambair.archs.support.ArchInfo` (the selective scan always runs in
  float32, so half-precision weights are safe);
* size requirements: none. Every network here takes any input size and pads inside ``forward`` exactly as
  the official code does (MambaIRUNet: reflection to a multiple of 8; MambaIRv2: the mirror image to a
  multiple of the window, which repeats the edge). Declaring ``multiple_of`` would make spandrel pad first,
  with its own reflect/replicate padding, and change the output near the bottom and right borders;
* tags: the official presets the weights match (e.g. ``lightSR_x4``; the three ``CAR_*`` share one
  network), then the inferred configuration (``embed_dim=60``, ``depths=6-6-6-6``, ...).

Arguments that leave no trace in the weights keep their defaults, as with ``load_model`` (``img_range`` 1.0,
as every official config). Importing :mod:`basicsr_mambair` does not import spandrel; this module does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .archs.support import FAMILIES, ArchFamily
from .errors import CheckpointError
from .presets import matching_presets
from .utils.checkpoint import load_checked

try:
    from spandrel import (
        MAIN_REGISTRY,
        Architecture,
        ArchRegistry,
        ArchSupport,
        ImageModelDescriptor,
        ModelTiling,
        SizeRequirements,
    )
except ImportError as exc:  # pragma: no cover  (spandrel is an extra)
    raise ImportError(f'basicsr_mambair.spandrel needs spandrel: pip install "basicsr-mambair[spandrel]" ({exc})') \
        from None

__all__ = ['MambaIRFamilyArch', 'arch_supports', 'install']


def _tag(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return '-'.join(str(v) for v in value)
    return str(value)


def tags(arch_type: str, kwargs: Mapping[str, Any]) -> list[str]:
    """The matching official presets, then ``name=value`` of every inferred constructor argument."""
    return [*matching_presets(arch_type, kwargs), *(f'{k}={_tag(v)}' for k, v in kwargs.items())]


class MambaIRFamilyArch(Architecture[nn.Module]):
    """A spandrel :class:`~spandrel.Architecture` for one :class:`~basicsr_mambair.archs.support.ArchFamily`."""

    def __init__(self, family: ArchFamily) -> None:
        super().__init__(id=family.arch_type, name=family.arch_type, detect=self._claims)
        self.family = family

    def _claims(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether ``state_dict`` is this family's: its key names, and a config inferred from every block."""
        try:
            return bool(self.family.detect(state_dict)) and self.family.infer(state_dict) is not None
        except Exception:  # noqa: BLE001  (CheckpointError, or a non-tensor value: not ours in any case)
            return False

    def load(self, state_dict: Mapping[str, Any]) -> ImageModelDescriptor[nn.Module]:
        """The network of ``state_dict`` (config inferred, weights loaded strictly) as an image model."""
        from basicsr.utils.registry import ARCH_REGISTRY

        arch_type = self.family.arch_type
        try:
            kwargs = self.family.infer(state_dict)
        except CheckpointError as exc:
            raise CheckpointError(f'cannot infer the {arch_type} config: {exc}') from None
        net = ARCH_REGISTRY.get(arch_type)(**kwargs)
        load_checked(net, state_dict, strict=True, source=f'the {arch_type} state dict')  # a clear error, if any
        info = self.family.describe(kwargs)
        return ImageModelDescriptor(
            net.eval(), dict(state_dict), architecture=self, purpose=info.purpose, tags=tags(arch_type, kwargs),
            supports_half=info.fp16, supports_bfloat16=info.bf16, scale=info.scale,
            input_channels=info.in_channels, output_channels=info.out_channels,
            size_requirements=SizeRequirements(),  # the networks pad inside, the official way (module docstring)
            tiling=ModelTiling.SUPPORTED,  # the official test pipeline itself runs in tiles
        )


def arch_supports(before: tuple[str, ...] = ()) -> list[ArchSupport]:
    """One :class:`~spandrel.ArchSupport` per family in :data:`~basicsr_mambair.archs.support.FAMILIES`,
    detected before the architectures ``before``."""
    return [ArchSupport(arch, arch.detect, before=tuple(before))
            for arch in (MambaIRFamilyArch(family) for family in FAMILIES.values())]


def install(registry: ArchRegistry | None = None) -> list[ArchSupport]:
    """Add our architectures to ``registry`` (spandrel's ``MAIN_REGISTRY`` by default, which every
    ``ModelLoader()`` uses), detected before those already there. Idempotent: ids present already (ours from
    an earlier call, or a spandrel that ships its own) are kept. Returns what was added."""
    registry = MAIN_REGISTRY if registry is None else registry
    ours = {family.arch_type for family in FAMILIES.values()}
    others = tuple(a.architecture.id for a in registry.architectures() if a.architecture.id not in ours)
    return registry.add(*arch_supports(before=others), ignore_duplicates=True)
