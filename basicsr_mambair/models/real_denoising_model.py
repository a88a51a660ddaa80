"""``RealDenoisingModel``: the official real-denoising (SIDD) training recipe on top of ``MambaIRModel``.

The official code trains MambaIRUNet with Restormer's ``ImageCleanModel`` and a modified
``train.py``. Everything that recipe adds to BasicSR lives here, driven by the same option keys:

- ``datasets:train``: ``iters``, ``gt_sizes``, ``mini_batch_sizes`` -- progressive training: for
  iterations in group j, the loaded batch (``batch_size_per_gpu`` patches of ``gt_size``) is
  randomly sub-sampled to ``mini_batch_sizes[j]`` patches and randomly cropped to ``gt_sizes[j]``.
  Officially ``batch_size_per_gpu: 1`` silently disables the mini-batch part (only the patch size
  changes); our option file loads ``max(mini_batch_sizes)`` so both change as intended.
- ``train:mixing_augs`` (``mixup``, ``mixup_beta``, ``use_identity``): Mixup of random pairs in
  the batch with lambda ~ Beta(beta, beta); with ``use_identity`` half the batches stay unmixed.
- ``train:use_grad_clip``: clip the gradient norm to 0.01 (the official value).
- ``train:scheduler:type: CosineAnnealingRestartCyclicLR`` (see :mod:`.lr_scheduler`).
- ``val:window_size``: reflect-pad validation inputs to a multiple (handled by ``MambaIRModel``).
- ``test()`` without tiling options runs the whole (padded) image, as ``ImageCleanModel`` and the official
  SIDD/DND test scripts do (``MambaIRModel``'s official 200-pixel tiles belong to the SR/DN/CAR code).
"""

from __future__ import annotations

import random

import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from .lr_scheduler import CosineAnnealingRestartCyclicLR
from .mambair_model import MambaIRModel

GRAD_CLIP_NORM = 0.01  # official value (Restormer, MambaIR realDN)


@MODEL_REGISTRY.register()
class RealDenoisingModel(MambaIRModel):
    """See the module docstring."""

    default_tiling = 'whole'

    def init_training_settings(self) -> None:
        train_opt = self.opt['train']
        mix = train_opt.get('mixing_augs') or {}
        self.mixup = bool(mix.get('mixup', False))
        self.mixup_beta = float(mix.get('mixup_beta', 1.2))
        self.mixup_identity = bool(mix.get('use_identity', False))
        self.use_grad_clip = bool(train_opt.get('use_grad_clip', False))

        data_opt = self.opt['datasets'].get('train', {})
        iters = data_opt.get('iters')
        self.progressive = None
        if iters:
            gt_sizes = data_opt.get('gt_sizes') or [data_opt['gt_size']] * len(iters)
            batch_sizes = data_opt.get('mini_batch_sizes') or [data_opt['batch_size_per_gpu']] * len(iters)
            if not len(iters) == len(gt_sizes) == len(batch_sizes):
                raise ValueError('datasets:train: iters, gt_sizes and mini_batch_sizes need the same length')
            if max(gt_sizes) > data_opt['gt_size'] or max(batch_sizes) > data_opt['batch_size_per_gpu']:
                raise ValueError('datasets:train: gt_size / batch_size_per_gpu must be at least the largest of '
                                 'gt_sizes / mini_batch_sizes (the loader provides the largest patches)')
            ends = [sum(iters[:i + 1]) for i in range(len(iters))]
            self.progressive = list(zip(ends, gt_sizes, batch_sizes))
        self._stage = None
        super().init_training_settings()

    def setup_schedulers(self) -> None:
        sched_opt = dict(self.opt['train']['scheduler'])
        if sched_opt.get('type') != 'CosineAnnealingRestartCyclicLR':
            return super().setup_schedulers()
        sched_opt.pop('type')
        self.schedulers.extend(CosineAnnealingRestartCyclicLR(o, **sched_opt) for o in self.optimizers)

    def _progressive_stage(self, current_iter: int) -> tuple[int, int, int]:
        for stage, (end, gt_size, batch) in enumerate(self.progressive):
            if current_iter <= end:
                return stage, gt_size, batch
        return len(self.progressive) - 1, *self.progressive[-1][1:]

    def prepare_batch(self, current_iter: int) -> None:
        if self.progressive:
            stage, gt_size, batch = self._progressive_stage(current_iter)
            if stage != self._stage:
                get_root_logger().info(f'Progressive training: patch size {gt_size}, batch size {batch} per process '
                                       f'from iteration {current_iter}')
                self._stage = stage
            self._subsample_and_crop(batch, gt_size)
        if self.mixup and (not self.mixup_identity or random.randint(0, 1) == 0):
            lam = torch.distributions.Beta(self.mixup_beta, self.mixup_beta).sample().item()
            perm = torch.randperm(self.gt.shape[0], device=self.gt.device)
            self.gt = lam * self.gt + (1 - lam) * self.gt[perm]
            self.lq = lam * self.lq + (1 - lam) * self.lq[perm]

    def _subsample_and_crop(self, batch: int, gt_size: int) -> None:
        scale = self.opt.get('scale', 1)
        if batch < self.lq.shape[0]:
            keep = torch.tensor(random.sample(range(self.lq.shape[0]), k=batch), device=self.lq.device)
            self.lq, self.gt = self.lq[keep], self.gt[keep]
        lq_size = gt_size // scale
        h, w = self.lq.shape[-2:]
        if lq_size < h or lq_size < w:
            top, left = random.randint(0, h - lq_size), random.randint(0, w - lq_size)
            self.lq = self.lq[..., top:top + lq_size, left:left + lq_size]
            self.gt = self.gt[..., top * scale:(top + lq_size) * scale, left * scale:(left + lq_size) * scale]

    def clip_gradients(self) -> None:
        if self.use_grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net_g.parameters(), GRAD_CLIP_NORM)
