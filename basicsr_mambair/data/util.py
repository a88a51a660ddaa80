"""Helpers shared by our datasets and the data-preparation tools (what BasicSR's data utilities lack).

BasicSR lists every file of a folder (``paths_from_folder`` would hand a ``README.txt`` to the
image decoder; we list with :func:`basicsr_mambair.image_io.list_images`), ``imfrombytes`` returns
``None`` for an unreadable file (the failure surfaces later as an obscure ``NoneType`` error), and
its datasets draw random numbers from the global numpy state. These helpers fill exactly those gaps;
everything else comes from BasicSR.
"""

from __future__ import annotations

import os
import os.path as osp
import zlib

import cv2
import numpy as np

from ..image_io import list_images


def read_meta_info(path: str) -> list[str]:
    """First field of every non-empty line of a BasicSR meta-info file (``name.png (h,w,c) ...``)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'meta_info_file not found: {path}')
    with open(path) as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names:
        raise ValueError(f'meta_info_file {path} lists no images')
    return names


def lmdb_keys(lmdb_path: str) -> list[str]:
    """Keys of a BasicSR LMDB (from its ``meta_info.txt``, as ``paths_from_lmdb`` reads them), sorted."""
    from basicsr.data.data_util import paths_from_lmdb

    if not lmdb_path.endswith('.lmdb'):
        raise ValueError(f"with io_backend 'lmdb' the data root must be a '.lmdb' folder, got {lmdb_path}")
    if not osp.isfile(osp.join(lmdb_path, 'meta_info.txt')):
        raise FileNotFoundError(f'{lmdb_path} is not a BasicSR LMDB (no meta_info.txt; make it with mambair-make-lmdb)')
    return sorted(paths_from_lmdb(lmdb_path))


def gt_paths(opt: dict) -> list[str]:
    """GT image paths of a dataset option dict: LMDB keys, a meta-info file's names, or a folder scan.

    Same three modes, in the same order of precedence, as BasicSR's ``PairedImageDataset``.
    """
    root = opt['dataroot_gt']
    if opt['io_backend']['type'] == 'lmdb':
        return lmdb_keys(root)
    if opt.get('meta_info_file'):
        return [osp.join(root, name) for name in read_meta_info(opt['meta_info_file'])]
    return [str(path) for path in list_images(root)]


def lq_name(gt_name: str, filename_tmpl: str = '{}', ext: str | None = None) -> str:
    """The LQ file name paired with the GT file ``gt_name``: ``filename_tmpl`` of its stem, then ``ext`` (CAR:
    ``.jpg``) or the GT's own extension (BasicSR's and the official ``paired_paths_from_folder`` rule)."""
    stem, gt_ext = osp.splitext(osp.basename(gt_name))
    return filename_tmpl.format(stem) + (gt_ext if ext is None else ext)


def decode_image(content: bytes | None, flag: str, path: str) -> np.ndarray:
    """``imfrombytes`` (uint8, BGR or gray) that fails with the image's name instead of returning None.

    Args:
        content: encoded file bytes (None when an LMDB key is missing).
        flag: ``'color'`` (3-channel BGR), ``'grayscale'`` or ``'unchanged'``.
        path: file path or LMDB key, for the error message.
    """
    from basicsr.utils import imfrombytes

    if content is None:
        raise FileNotFoundError(f'image not found: {path}')
    img = imfrombytes(content, flag=flag, float32=False)
    if img is None:
        raise ValueError(f'cannot decode image {path} (corrupt or not an image)')
    return img


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 image (gray HxW / HxWx1, or BGR) at ``quality`` (1-100), with OpenCV.

    OpenCV's defaults: baseline, 4:2:0 chroma subsampling for colour, no optimisation. The same
    function makes the pre-generated test sets (``mambair-make-jpeg``) and the on-the-fly training
    inputs, so both are byte-identical for the same image and quality.
    """
    if img.dtype != np.uint8:
        raise ValueError(f'JPEG encoding needs a uint8 image, got {img.dtype}')
    if not 1 <= int(quality) <= 100:
        raise ValueError(f'JPEG quality must be in 1..100, got {quality}')
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f'OpenCV could not JPEG-encode an image of shape {img.shape}')
    return buf.tobytes()


def parse_range(value, name: str, low: float, high: float, integer: bool = False) -> tuple[float, float]:
    """A scalar or a ``[lo, hi]`` option as a checked ``(lo, hi)`` tuple inside ``[low, high]``."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"option '{name}' must be a number or [min, max], got {value!r}")
        lo, hi = value
    else:
        lo = hi = value
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and int(v) != v):
            kind = 'an integer' if integer else 'a number'
            raise ValueError(f"option '{name}' must be {kind} or [min, max], got {value!r}")
    if not low <= lo <= hi <= high:
        raise ValueError(f"option '{name}' must lie in [{low}, {high}] with min <= max, got {value!r}")
    return (int(lo), int(hi)) if integer else (float(lo), float(hi))


def name_seed(seed: int, key: str) -> list[int]:
    """A numpy seed from a fixed seed and an image's name without extension (a file path or an LMDB key):
    stable across runs, file orders, backends and OSes."""
    stem = osp.splitext(osp.basename(key))[0]
    return [int(seed), zlib.crc32(stem.encode('utf-8'))]


class ProcessRNG:
    """A numpy ``Generator`` for training-time randomness, fresh in every process.

    Seeded from ``torch.initial_seed()``, which PyTorch sets differently in every dataloader worker
    (``base_seed + worker_id``, ``base_seed`` drawn anew from the main process's torch generator
    for each epoch) and which equals ``manual_seed`` in the main process. Hence: different numbers
    in every worker and every epoch, a stream that advances from one sample to the next, and the
    same numbers again for the same ``manual_seed``, all without reading or changing numpy's
    global state. The process id is part of the key so that a generator inherited by a forked
    worker is never reused there.
    """

    def __init__(self, salt: int = 0):
        self.salt = int(salt)
        self._key: tuple[int, int] | None = None
        self._gen: np.random.Generator | None = None

    def get(self) -> np.random.Generator:
        """This process's generator."""
        import torch

        key = (os.getpid(), torch.initial_seed())
        if key != self._key or self._gen is None:
            self._gen = np.random.default_rng([key[1], self.salt])
            self._key = key
        return self._gen

    def __getstate__(self) -> dict:  # a pickled copy (spawned worker) starts afresh
        return {'salt': self.salt, '_key': None, '_gen': None}


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 HxW / HxWxC -> float32 HxWxC in [0, 1] (gray images get a channel axis)."""
    if img.ndim == 2:
        img = img[:, :, None]
    return img.astype(np.float32) / 255.0


def check_same_size(gt: np.ndarray, lq: np.ndarray, gt_key: str, lq_key: str) -> None:
    """Restoration pairs (scale 1) must have the same height and width."""
    if gt.shape[:2] != lq.shape[:2]:
        raise ValueError(f'GT {gt_key} is {gt.shape[1]}x{gt.shape[0]} but LQ {lq_key} is {lq.shape[1]}x{lq.shape[0]}')
