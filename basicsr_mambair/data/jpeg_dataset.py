"""JPEG compression-artifact reduction (CAR) data: pre-generated JPEGs, or JPEGs encoded on the fly.

Official MambaIR (``task: CAR`` in its modified ``PairedImageDataset``, spec 4.3): the LQ images are
pre-generated JPEGs in ``LQ/<quality>/<basename>.jpg`` beside the clean ``HQ/`` folder (the LQ
name always ends in ``.jpg`` whatever the GT extension); both are read with OpenCV as grayscale
uint8, given a channel axis and divided by 255; the network has ``in_chans: 1``. This dataset
reads that layout (folder or LMDB) and can instead encode the GT with OpenCV at a quality, or a
quality drawn from a range per training image, so no LQ copy of a training set is needed.
"""

from __future__ import annotations

import os.path as osp

import numpy as np
from basicsr.data.data_util import paired_paths_from_lmdb
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import FileClient, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from .util import (
    ProcessRNG,
    check_same_size,
    decode_image,
    encode_jpeg,
    gt_paths,
    lq_name,
    name_seed,
    parse_range,
    to_float,
)


@DATASET_REGISTRY.register()
class JPEGArtifactDataset(data.Dataset):
    """Clean images and their JPEG-compressed versions, grayscale by default (as officially).

    Options (``datasets:<phase>`` of an option file):
        dataroot_gt (str): folder of clean images, or a ``.lmdb`` (``mambair-make-lmdb``).
        dataroot_lq (str): folder of pre-generated JPEGs, e.g. ``LQ/40`` (``mambair-make-jpeg``),
            or a ``.lmdb`` with the same keys as the GT one. Give this **or** ``quality``.
        quality (int | [int, int]): encode the GT with OpenCV at this JPEG quality (1-100), or at a
            quality drawn uniformly per training image from the range (validation: a fixed
            quality per image name, from ``val_quality_seed``, default 0).
        io_backend (dict): ``{type: disk}`` or ``{type: lmdb}``.
        meta_info_file (str, optional): list of GT image names (disk backend).
        filename_tmpl (str): LQ base name from the GT base name; default ``'{}'``.
        lq_ext (str): extension of the pre-generated LQ files; default ``'.jpg'`` (official).
        gray (bool): grayscale (1 channel); default true. False: colour BGR->RGB, 3 channels.
        gt_size (int): training crop size in pixels. use_hflip / use_rot (bool): augmentation.

    Items: ``{'lq', 'gt'}`` float32 tensors CxHxW in [0, 1], ``{'lq_path', 'gt_path'}``.
    """

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        name = opt.get('name')
        self.is_train = opt['phase'] == 'train'
        self.flag = 'grayscale' if opt.get('gray', True) else 'color'
        self.io_backend_opt = dict(opt['io_backend'])
        if self.is_train and 'gt_size' not in opt:
            raise ValueError(f"dataset {name}: training needs 'gt_size' (crop size in pixels)")
        has_lq, has_quality = opt.get('dataroot_lq') is not None, opt.get('quality') is not None
        if has_lq == has_quality:
            raise ValueError(f"dataset {name}: give either 'dataroot_lq' (pre-generated JPEGs) or 'quality' "
                             '(encode on the fly), not ' + ('both' if has_lq else 'neither'))
        self.quality = parse_range(opt['quality'], 'quality', 1, 100, integer=True) if has_quality else None
        self.val_quality_seed = int(opt.get('val_quality_seed', 0))

        if self.quality is not None:
            self.paths = [{'gt_path': p, 'lq_path': p} for p in gt_paths(opt)]
        elif self.io_backend_opt['type'] == 'lmdb':
            self.paths = paired_paths_from_lmdb([opt['dataroot_lq'], opt['dataroot_gt']], ['lq', 'gt'])
        else:
            self.paths = self._pregenerated_pairs(opt)
        self.file_client: FileClient | None = None
        self.rng = ProcessRNG()

    @staticmethod
    def _pregenerated_pairs(opt: dict) -> list[dict]:
        tmpl, ext = opt.get('filename_tmpl', '{}'), opt.get('lq_ext', '.jpg')
        lq_root = opt['dataroot_lq']
        if not osp.isdir(lq_root):
            raise FileNotFoundError(f'dataroot_lq not found: {lq_root}')
        pairs, missing = [], []
        for gt in gt_paths(opt):
            lq = osp.join(lq_root, lq_name(gt, tmpl, ext))
            if not osp.isfile(lq):
                missing.append((gt, lq))
            pairs.append({'gt_path': gt, 'lq_path': lq})
        if missing:
            gt, lq = missing[0]
            raise FileNotFoundError(f'{len(missing)} of {len(pairs)} LQ images missing in {lq_root}, e.g. '
                                    f'{osp.basename(lq)} for {osp.basename(gt)} (LQ files are named <GT name>{ext}; '
                                    'make them with mambair-make-jpeg)')
        return pairs

    def _client(self) -> FileClient:
        if self.file_client is None:
            backend = dict(self.io_backend_opt)
            kind = backend.pop('type')
            if kind == 'lmdb':
                if self.quality is None:
                    backend.update(db_paths=[self.opt['dataroot_lq'], self.opt['dataroot_gt']],
                                   client_keys=['lq', 'gt'])
                else:
                    backend.update(db_paths=[self.opt['dataroot_gt']], client_keys=['gt'])
            self.file_client = FileClient(kind, **backend)
        return self.file_client

    def jpeg_quality(self, key: str) -> int:
        """The JPEG quality for image ``key`` (on-the-fly mode): random in training, fixed otherwise."""
        lo, hi = self.quality
        if lo == hi:
            return lo
        if self.is_train:
            return int(self.rng.get().integers(lo, hi + 1))
        return int(np.random.RandomState(name_seed(self.val_quality_seed, key)).randint(lo, hi + 1))

    def __getitem__(self, index: int) -> dict:
        gt_path, lq_path = self.paths[index]['gt_path'], self.paths[index]['lq_path']
        client = self._client()
        img_gt = decode_image(client.get(gt_path, 'gt'), self.flag, gt_path)
        if self.quality is None:
            img_lq = decode_image(client.get(lq_path, 'lq'), self.flag, lq_path)
        else:
            img_lq = decode_image(encode_jpeg(img_gt, self.jpeg_quality(gt_path)), self.flag, gt_path)
        check_same_size(img_gt, img_lq, gt_path, lq_path)
        img_gt, img_lq = to_float(img_gt), to_float(img_lq)
        if self.is_train:
            img_gt, img_lq = paired_random_crop(img_gt, img_lq, self.opt['gt_size'], 1, gt_path)
            img_gt, img_lq = augment([img_gt, img_lq], self.opt.get('use_hflip', False), self.opt.get('use_rot', False))
        img_gt, img_lq = img2tensor([img_gt, img_lq], bgr2rgb=True, float32=True)
        return {'lq': img_lq, 'gt': img_gt, 'lq_path': lq_path, 'gt_path': gt_path}

    def __len__(self) -> int:
        return len(self.paths)
