"""``MambaIRv2Model`` / ``MambaIRv2LightModel``: the model types the official MambaIRv2 option files name.

Officially the same code as ``MambaIRModel`` (spec 4.2: only the class name and docstring differ), so here
they are :class:`~.mambair_model.MambaIRModel` under the official names. Training runs the network in
``train()``, i.e. with Gumbel routing unless ``network_g.routing`` says otherwise; validation and testing run
it in ``eval()`` (deterministic routing by default).
"""

from __future__ import annotations

from basicsr.utils.registry import MODEL_REGISTRY

from .mambair_model import MambaIRModel


@MODEL_REGISTRY.register()
class MambaIRv2Model(MambaIRModel):
    """``MambaIRModel`` under the name of the official MambaIRv2 option files."""


@MODEL_REGISTRY.register()
class MambaIRv2LightModel(MambaIRModel):
    """``MambaIRModel`` under the name of the official MambaIRv2-light option files."""
