"""Stochastic depth ("DropPath"), the per-sample residual-branch dropout of timm, without depending on timm."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero a residual branch for a random subset of the samples while training.

    Each sample's branch output is kept with probability ``1 - drop_prob`` and scaled by
    ``1 / (1 - drop_prob)`` so that its expectation is unchanged (timm's ``DropPath`` with
    ``scale_by_keep=True``). Identity in eval mode and for ``drop_prob == 0``. Has no parameters.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, ...) -> same shape."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            mask.div_(keep_prob)
        return x * mask

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob:.3f}'
