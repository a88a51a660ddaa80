"""Learning-rate schedules BasicSR 1.4.2 lacks (used by the real-denoising recipe)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler


class CosineAnnealingRestartCyclicLR(LRScheduler):
    """Cosine annealing in consecutive cycles, each with its own floor (Restormer's schedule).

    Cycle i lasts ``periods[i]`` iterations; within it the rate goes from
    ``eta_mins[i] + restart_weights[i] * (base_lr - eta_mins[i])`` down to ``eta_mins[i]`` on a
    half cosine. The official real-denoising recipe: periods (92000, 208000), eta_mins
    (3e-4, 1e-6) with base 3e-4, i.e. constant 3e-4, then cosine to 1e-6.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, periods: Sequence[int],
                 restart_weights: Sequence[float] = (1,), eta_mins: Sequence[float] = (0,), last_epoch: int = -1):
        if not (len(periods) == len(restart_weights) == len(eta_mins)):
            raise ValueError('scheduler: periods, restart_weights and eta_mins need the same length')
        self.periods = list(periods)
        self.restart_weights = list(restart_weights)
        self.eta_mins = list(eta_mins)
        self.cumulative_period = [sum(self.periods[:i + 1]) for i in range(len(self.periods))]
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        # cycle i covers iterations (cumulative[i-1], cumulative[i]]; past the end, the last cycle holds
        idx = min(bisect.bisect_left(self.cumulative_period, self.last_epoch), len(self.periods) - 1)
        start = self.cumulative_period[idx - 1] if idx else 0
        progress = min((self.last_epoch - start) / self.periods[idx], 1.0)
        eta_min, weight = self.eta_mins[idx], self.restart_weights[idx]
        return [eta_min + weight * 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * progress))
                for base_lr in self.base_lrs]
