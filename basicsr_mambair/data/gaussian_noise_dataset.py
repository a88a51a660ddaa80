"""Gaussian denoising data: clean images only; the noisy input is made on the fly (colour or gray).

The official MambaIR code does this inside its modified ``PairedImageDataset`` (``task:
denoising_color`` / ``denoising_gray``, spec 4.3): read the GT as float32 in [0, 1], add
``np.random.normal(0, sigma / 255, gt.shape)`` to the **whole** image (float64 result, neither
clipped nor quantised), then random-crop and augment the pair. Here the same, with two changes
that do not alter what the network sees:

- training noise comes from a per-process numpy ``Generator`` (:class:`~.util.ProcessRNG`)
  instead of numpy's global state: it differs between iterations, dataloader workers and epochs,
  and repeats for the same ``manual_seed``;
- validation noise is made with ``np.random.RandomState(val_noise_seed).normal(0, sigma / 255,
  shape)`` for every image. The official code calls ``np.random.seed(0)`` right before the same
  ``np.random.normal`` call, so with the default ``val_noise_seed: 0`` the noisy validation
  images are bit-identical to the official ones (and published PSNRs comparable), while numpy's
  global random state is neither read nor changed.
"""

from __future__ import annotations

import numpy as np
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import FileClient, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from .util import ProcessRNG, decode_image, gt_paths, name_seed, parse_range, to_float


@DATASET_REGISTRY.register()
class GaussianNoiseDataset(data.Dataset):
    """Clean images + additive white Gaussian noise (AWGN), for Gaussian colour or gray denoising.

    Options (``datasets:<phase>`` of an option file):
        dataroot_gt (str): folder of clean images, or a ``.lmdb`` made by ``mambair-make-lmdb``.
        io_backend (dict): ``{type: disk}`` or ``{type: lmdb}`` (BasicSR's ``FileClient``).
        meta_info_file (str, optional): list of image names under ``dataroot_gt`` (disk backend).
        noise (float | [float, float]): sigma on the 0-255 scale, or a range from which every
            training image draws a sigma uniformly (validation: a fixed sigma per image name).
        gray (bool): read images as grayscale (1 channel, ``in_chans: 1``); default false (BGR->RGB).
        val_noise_seed (int): seed of the validation noise; default 0 = the official noise.
        gt_size (int): training crop size in pixels. use_hflip / use_rot (bool): augmentation.
        dataroot_lq: not used (the official files point it at the GT folder; allowed for that).

    Items: ``{'lq', 'gt'}`` float32 tensors CxHxW (RGB or 1 channel; ``lq`` unclipped) and
    ``{'lq_path', 'gt_path'}`` (both the GT path or LMDB key).
    """

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        self.is_train = opt['phase'] == 'train'
        if 'noise' not in opt:
            raise ValueError(f"dataset {opt.get('name')}: option 'noise' (sigma on the 0-255 scale) is required")
        self.sigma = parse_range(opt['noise'], 'noise', 0, 255)
        self.flag = 'grayscale' if opt.get('gray', False) else 'color'
        self.val_noise_seed = int(opt.get('val_noise_seed', 0))
        if self.is_train and 'gt_size' not in opt:
            raise ValueError(f"dataset {opt.get('name')}: training needs 'gt_size' (crop size in pixels)")
        self.io_backend_opt = dict(opt['io_backend'])
        self.paths = gt_paths(opt)
        self.file_client: FileClient | None = None
        self.rng = ProcessRNG()

    def _client(self) -> FileClient:
        if self.file_client is None:
            backend = dict(self.io_backend_opt)
            kind = backend.pop('type')
            if kind == 'lmdb':
                backend.update(db_paths=[self.opt['dataroot_gt']], client_keys=['gt'])
            self.file_client = FileClient(kind, **backend)
        return self.file_client

    def noise(self, shape: tuple[int, ...], key: str) -> np.ndarray:
        """float64 noise of ``shape`` (0-1 scale) for the image ``key``: random in training, fixed otherwise."""
        lo, hi = self.sigma
        if self.is_train:
            rng = self.rng.get()
            sigma = lo if lo == hi else rng.uniform(lo, hi)
            return rng.normal(0.0, sigma / 255.0, shape)
        # a sigma range in validation: a fixed sigma per image name (the official files use one sigma)
        sigma = lo if lo == hi else np.random.RandomState(name_seed(self.val_noise_seed, key)).uniform(lo, hi)
        return np.random.RandomState(self.val_noise_seed).normal(0.0, sigma / 255.0, shape)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        img_gt = to_float(decode_image(self._client().get(path, 'gt'), self.flag, path))
        # float32 + float64 noise -> float64, as officially; not clipped
        img_lq = img_gt + self.noise(img_gt.shape, path)
        if self.is_train:
            img_gt, img_lq = paired_random_crop(img_gt, img_lq, self.opt['gt_size'], 1, path)
            img_gt, img_lq = augment([img_gt, img_lq], self.opt.get('use_hflip', False), self.opt.get('use_rot', False))
        img_gt, img_lq = img2tensor([img_gt, img_lq], bgr2rgb=True, float32=True)
        return {'lq': img_lq, 'gt': img_gt, 'lq_path': path, 'gt_path': path}

    def __len__(self) -> int:
        return len(self.paths)
