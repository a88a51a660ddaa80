"""``MambaIRModel``: BasicSR's ``SRModel`` with safe checkpoint loading and every torch optimizer."""

from __future__ import annotations

from copy import deepcopy

import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class MambaIRModel(SRModel):
    """Training exactly as ``SRModel``; see the methods for what differs."""

    def get_optimizer(self, optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
        # BasicSR 1.4.2 knows only Adam; any optimizer in torch.optim is accepted by name here.
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise ValueError(f"optim_g: unknown optimizer type '{optim_type}' (use a torch.optim class, e.g. AdamW)")
        return optim_cls(params, lr, **kwargs)

    def load_network(self, net, load_path: str, strict: bool = True, param_key: str | None = 'params') -> None:
        """BasicSR's ``load_network`` with ``weights_only=True``."""
        logger = get_root_logger()
        net = self.get_bare_model(net)
        load_net = torch.load(load_path, map_location='cpu', weights_only=True)
        if param_key is not None:
            if param_key not in load_net and 'params' in load_net:
                param_key = 'params'
            load_net = load_net[param_key]
        logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
        load_net = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in deepcopy(load_net).items()}
        self._print_different_keys_loading(net, load_net, strict)
        net.load_state_dict(load_net, strict=strict)
