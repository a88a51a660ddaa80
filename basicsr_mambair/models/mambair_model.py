"""``MambaIRModel``: BasicSR's ``SRModel`` with safe checkpoint loading and every torch optimizer."""

from __future__ import annotations

import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from basicsr_mambair.utils.checkpoint import load_checked, read_state_dict


@MODEL_REGISTRY.register()
class MambaIRModel(SRModel):
    """Training exactly as ``SRModel``; see the methods for what differs."""

    def get_optimizer(self, optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
        # BasicSR 1.4.2 knows only Adam; any optimizer in torch.optim is accepted by name here.
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise ValueError(f"optim_g: unknown optimizer type '{optim_type}' "
                             '(any torch.optim class, e.g. Adam, AdamW)')
        return optim_cls(params, lr, **kwargs)

    def load_network(self, net, load_path: str, strict: bool = True, param_key: str | None = 'params') -> None:
        """BasicSR's ``load_network``, safe and explicit.

        Reads with ``weights_only=True`` (pickled code is refused), takes ``param_key`` (falling back to
        ``params`` as BasicSR does, or a bare state dict), strips ``module.``. A checkpoint that does not fit
        raises one error naming the config difference and the keys; with ``strict=False`` mismatched shapes
        are skipped with a warning (BasicSR's convention, used to fine-tune x3/x4 from x2).
        """
        logger = get_root_logger()
        net = self.get_bare_model(net)
        state_dict = read_state_dict(load_path, param_key, logger=logger)
        logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
        load_checked(net, state_dict, strict=strict, source=load_path, logger=logger)
