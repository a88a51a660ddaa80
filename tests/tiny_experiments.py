"""Small, real training setups for end-to-end tests of the CLI (seconds per run on one core)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

# Photographs bundled with scikit-image: real images without any download.
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')
# A small, real MambaIR (lightweight-SR head; channel attention needs >= 30 channels) through the pipeline.
TINY_NETWORK = dict(type='MambaIR', upscale=2, in_chans=3, embed_dim=30, depths=[1], d_state=4, mlp_ratio=1.0,
                    upsampler='pixelshuffledirect')


def make_sr_pairs(root: Path, scale: int = 2, size: int = 96, per_photo: int = 2) -> tuple[Path, Path]:
    """Write HR crops and their MATLAB-bicubic LR versions as PNG under ``root/{hr,lr}``."""
    import skimage.data
    from basicsr.utils.matlab_functions import imresize

    hr_dir, lr_dir = root / 'hr', root / f'lr_x{scale}'
    hr_dir.mkdir(parents=True, exist_ok=True)
    lr_dir.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        rgb = getattr(skimage.data, name)()
        for k in range(per_photo):
            top, left = 40 + 60 * k, 60 + 50 * k
            hr = np.ascontiguousarray(rgb[top:top + size, left:left + size, ::-1])  # BGR for OpenCV
            lr = np.clip(np.round(imresize(hr.astype(np.float64) / 255.0, 1 / scale) * 255), 0, 255).astype(np.uint8)
            cv2.imwrite(str(hr_dir / f'{name}_{k}.png'), hr)
            cv2.imwrite(str(lr_dir / f'{name}_{k}.png'), lr)
    return hr_dir, lr_dir


def sr_train_options(name: str, hr_dir: Path, lr_dir: Path, network: dict, scale: int = 2, total_iter: int = 20,
                     save_freq: int = 10, val_freq: int = 10, gt_size: int = 32) -> dict:
    """A complete BasicSR training option dict for ``MambaIRModel`` on the given folders."""
    data = dict(type='PairedImageDataset', dataroot_gt=str(hr_dir), dataroot_lq=str(lr_dir),
                io_backend=dict(type='disk'), filename_tmpl='{}')
    return dict(
        name=name, model_type='MambaIRModel', scale=scale, num_gpu='auto', manual_seed=0,
        datasets=dict(
            train=dict(name='train', **data, gt_size=gt_size, use_hflip=True, use_rot=True, num_worker_per_gpu=0,
                       batch_size_per_gpu=2, dataset_enlarge_ratio=20, prefetch_mode=None),
            val=dict(name='val', **data)),
        network_g=network,
        path=dict(pretrain_network_g=None, strict_load_g=True, resume_state=None),
        train=dict(optim_g=dict(type='Adam', lr=2e-4, weight_decay=0, betas=[0.9, 0.99]),
                   scheduler=dict(type='MultiStepLR', milestones=[10 * total_iter], gamma=0.5),
                   total_iter=total_iter, warmup_iter=-1,
                   pixel_opt=dict(type='L1Loss', loss_weight=1.0, reduction='mean')),
        val=dict(val_freq=val_freq, save_img=False,
                 metrics=dict(psnr=dict(type='calculate_psnr', crop_border=scale, test_y_channel=True))),
        logger=dict(print_freq=5, save_checkpoint_freq=save_freq, use_tb_logger=True),
        dist_params=dict(backend='gloo', port=29500),
    )


def sr_test_options(name: str, hr_dir: Path, lr_dir: Path, network: dict, weights: Path, scale: int = 2) -> dict:
    """A test option dict for the ``network`` saved at ``weights``: :func:`sr_train_options`' validation pairs as
    ``test_1`` (named ``pairs``), images saved."""
    opt = {k: v for k, v in sr_train_options(name, hr_dir, lr_dir, network, scale=scale).items() if k != 'train'}
    opt['datasets'] = {'test_1': dict(opt['datasets']['val'], name='pairs')}
    opt['path'] = dict(pretrain_network_g=str(weights), strict_load_g=True)
    opt['val'] = dict(opt['val'], save_img=True)
    return opt


def load_options(relative: str) -> dict:
    """A shipped option file (``options/<relative>``) as plain dicts."""
    return yaml.safe_load((Path(__file__).resolve().parents[1] / 'options' / relative).read_text())


def write_options(path: Path, opt: dict) -> Path:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path



class TinyPerceptualLoss(torch.nn.Module):
    """Stands in for BasicSR's ``PerceptualLoss`` in tests (that one needs ImageNet VGG weights, which cannot be
    downloaded here): L1 between the features of a fixed random 3x3 conv; returns ``(percep, style)`` like it.
    Registered in BasicSR's LOSS_REGISTRY by :func:`register_tiny_losses` (in the training subprocess)."""

    def __init__(self, perceptual_weight: float = 1.0) -> None:
        super().__init__()
        self.perceptual_weight = perceptual_weight
        self.register_buffer('weight', torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, None]:
        features = [torch.nn.functional.conv2d(t, self.weight, padding=1) for t in (x, gt)]
        return self.perceptual_weight * torch.nn.functional.l1_loss(*features), None


def register_tiny_losses() -> None:
    """Make ``type: TinyPerceptualLoss`` buildable by BasicSR (once per process)."""
    from basicsr.utils.registry import LOSS_REGISTRY

    if 'TinyPerceptualLoss' not in LOSS_REGISTRY:
        LOSS_REGISTRY.register(TinyPerceptualLoss)
