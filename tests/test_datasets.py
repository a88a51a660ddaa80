"""GaussianNoiseDataset and JPEGArtifactDataset on real images: official equivalence, randomness, backends."""

from __future__ import annotations

import os
import random
import shutil
import zlib

import cv2
import numpy as np
import pytest
import torch
from basicsr.data import build_dataset
from basicsr.utils import img2tensor
from torch.utils.data import DataLoader

from basicsr_mambair.cli import make_jpeg, make_lmdb, make_lr

DISK = {'type': 'disk'}


def noise_set(root, phase='val', **extra) -> torch.utils.data.Dataset:
    opt = dict(name='dn', type='GaussianNoiseDataset', phase=phase, scale=1, dataroot_gt=str(root), io_backend=DISK,
               noise=25)
    if phase == 'train':
        opt.update(gt_size=48, use_hflip=True, use_rot=True)
    opt.update(extra)
    return build_dataset(opt)


def jpeg_set(gt_root, phase='val', **extra) -> torch.utils.data.Dataset:
    opt = dict(name='car', type='JPEGArtifactDataset', phase=phase, scale=1, dataroot_gt=str(gt_root), io_backend=DISK)
    if phase == 'train':
        opt.update(gt_size=48, use_hflip=True, use_rot=True)
    opt.update(extra)
    return build_dataset(opt)


@pytest.fixture(scope='module')
def cbsd(tmp_path_factory, shared_data):
    """Four real CBSD68 images (colour, 481x321 / 321x481) and a README that must be ignored."""
    root = tmp_path_factory.mktemp('cbsd')
    for path in sorted((shared_data / 'CBSD68').glob('*.png'))[:4]:
        shutil.copy(path, root)
    (root / 'README.txt').write_text('not an image')
    return root


def _official_val_lq(path, sigma: float, gray: bool = False) -> torch.Tensor:
    """The official `denoising_color/gray` validation input, computed the official way (global numpy seed 0)."""
    state = np.random.get_state()
    try:
        flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
        gt = cv2.imread(str(path), flag).astype(np.float32) / 255.0
        np.random.seed(seed=0)
        lq = gt + np.random.normal(0, sigma / 255.0, gt.shape)
    finally:
        np.random.set_state(state)
    return img2tensor(lq[..., None] if gray else lq, bgr2rgb=True, float32=True)


def test_validation_noise_is_the_official_noise_and_leaves_global_rng_alone(cbsd):
    ds = noise_set(cbsd, noise=15)
    assert len(ds) == 4  # README.txt skipped
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    for i in range(2):
        item = ds[i]
        assert torch.equal(item['lq'], _official_val_lq(item['gt_path'], 15))
        assert item['lq'].dtype == torch.float32 and item['lq'].shape == item['gt'].shape
        assert item['lq'].min() < 0 or item['lq'].max() > 1  # unclipped
    assert np.array_equal(np.random.get_state()[1], before), 'the global numpy state must not be used'


def test_validation_noise_identical_between_runs(cbsd):
    first = [noise_set(cbsd)[i]['lq'] for i in range(2)]
    np.random.seed(7), torch.manual_seed(7), random.seed(7)  # whatever else happened in between
    np.random.normal(size=1000)
    again = [noise_set(cbsd)[i]['lq'] for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_seed = noise_set(cbsd, val_noise_seed=1)[0]['lq']
    assert not torch.equal(other_seed, first[0])


def test_gray_denoising_matches_official_gray_task(shared_data):
    ds = noise_set(shared_data / 'Set12', noise=50, gray=True)
    item = ds[0]
    assert item['gt'].shape[0] == 1
    assert torch.equal(item['lq'], _official_val_lq(item['gt_path'], 50, gray=True))


def _noise_of(item) -> torch.Tensor:
    return item['lq'] - item['gt']


def test_training_noise_differs_between_iterations_and_is_reproducible(cbsd):
    torch.manual_seed(0)
    ds = noise_set(cbsd, phase='train')
    a, b = ds[0], ds[0]
    assert a['lq'].shape == (3, 48, 48)
    na, nb = _noise_of(a), _noise_of(b)
    assert not torch.allclose(na, nb)
    for n in (na, nb):  # sigma 25 on the 0-255 scale
        assert abs(float(n.std()) * 255 - 25) < 2.5 and abs(float(n.mean()) * 255) < 2.5

    def sample() -> dict:
        torch.manual_seed(0)  # BasicSR's manual_seed seeds torch: our noise stream follows it
        random.seed(1)  # crop position and flips (python's random, as in BasicSR)
        return noise_set(cbsd, phase='train')[1]

    assert torch.equal(sample()['lq'], sample()['lq'])


class _SameIndex(torch.utils.data.Sampler):
    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter([0] * self.n)

    def __len__(self):
        return self.n


def test_training_noise_differs_between_dataloader_workers(tmp_path, cbsd):
    """Two workers load the same 64x64 image twice each (the crop is the whole image, no flips):
    four different noise maps, i.e. no two workers or iterations share random numbers."""
    root = tmp_path / 'one'
    root.mkdir()
    cv2.imwrite(str(root / 'crop.png'), cv2.imread(str(sorted(cbsd.glob('*.png'))[0]))[:64, :64])
    ds = noise_set(root, phase='train', gt_size=64, use_hflip=False, use_rot=False)
    torch.manual_seed(0)
    noises = [b['lq'][0] - b['gt'][0] for b in DataLoader(ds, batch_size=1, sampler=_SameIndex(4), num_workers=2)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(noises[i], noises[j]), (i, j)


def test_noise_range(cbsd):
    torch.manual_seed(1)
    ds = noise_set(cbsd, phase='train', noise=[5, 50], gt_size=160)
    stds = [float(_noise_of(ds[i % 4]).std()) * 255 for i in range(12)]
    assert 4 < min(stds) and max(stds) < 52 and max(stds) - min(stds) > 10
    val = noise_set(cbsd, noise=[5, 50])
    assert torch.equal(val[2]['lq'], val[2]['lq'])  # fixed per image
    with pytest.raises(ValueError, match="option 'noise'"):
        noise_set(cbsd, noise=[50, 5])


@pytest.fixture(scope='module')
def car_data(tmp_path_factory, shared_data):
    """Three LIVE1 gray images as HQ/ + LQ/{10,40}/ made by mambair-make-jpeg."""
    root = tmp_path_factory.mktemp('car')
    src = root / 'src'
    src.mkdir()
    for name in ('caps.png', 'monarch.png', 'parrots.png'):
        shutil.copy(shared_data / 'LIVE1' / 'gray' / name, src)
    assert make_jpeg.main([str(src), str(root / 'set'), '-q', '10', '40', '-j', '1']) == 0
    return root / 'set'


def test_pregenerated_jpeg_pairs_read_as_officially(car_data):
    ds = jpeg_set(car_data / 'HQ', dataroot_lq=str(car_data / 'LQ' / '10'))
    assert len(ds) == 3
    item = ds[0]
    assert item['lq_path'].endswith('caps.jpg') and item['gt'].shape[0] == 1
    official = cv2.imread(item['lq_path'], cv2.IMREAD_GRAYSCALE).astype(np.float32)[None] / 255.0
    assert torch.equal(item['lq'], torch.from_numpy(official))
    assert not torch.equal(item['lq'], item['gt'])


def test_on_the_fly_jpeg_equals_pregenerated(car_data):
    pre = jpeg_set(car_data / 'HQ', dataroot_lq=str(car_data / 'LQ' / '40'))
    fly = jpeg_set(car_data / 'HQ', quality=40)
    for i in range(3):
        assert torch.equal(pre[i]['lq'], fly[i]['lq']) and torch.equal(pre[i]['gt'], fly[i]['gt'])


def test_jpeg_quality_range(car_data):
    torch.manual_seed(0)
    train = jpeg_set(car_data / 'HQ', phase='train', quality=[10, 40], gt_size=64)
    qualities = {train.jpeg_quality('caps.png') for _ in range(20)}
    assert len(qualities) > 5 and min(qualities) >= 10 and max(qualities) <= 40
    val = jpeg_set(car_data / 'HQ', quality=[10, 40])
    assert len({val.jpeg_quality('caps.png') for _ in range(5)}) == 1
    assert val[1]['lq'].shape == val[1]['gt'].shape


def test_dataset_errors_are_clear(tmp_path, car_data):
    with pytest.raises(ValueError, match="either 'dataroot_lq'.*or 'quality'.*both"):
        jpeg_set(car_data / 'HQ', dataroot_lq=str(car_data / 'LQ' / '10'), quality=10)
    with pytest.raises(ValueError, match='neither'):
        jpeg_set(car_data / 'HQ')
    with pytest.raises(FileNotFoundError, match='1 of 3 LQ images missing.*parrots.jpg'):
        partial = tmp_path / 'partial'
        shutil.copytree(car_data / 'LQ' / '10', partial)
        (partial / 'parrots.jpg').unlink()
        jpeg_set(car_data / 'HQ', dataroot_lq=str(partial))
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'a.png').write_bytes(b'garbage')
    with pytest.raises(ValueError, match='cannot decode image .*a.png'):
        noise_set(broken)[0]
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        noise_set(tmp_path / 'nowhere')
    with pytest.raises(ValueError, match="'noise'"):
        build_dataset(dict(name='x', type='GaussianNoiseDataset', phase='val', dataroot_gt=str(broken),
                           io_backend=DISK))


def _pairs(ds, indices) -> dict:
    """Items of ``ds`` by image name, python's random (crops, flips) seeded from the name first.

    (Folder scans and LMDB keys may list the images in different orders.)
    """
    out = {}
    for i in indices:
        path = ds.paths[i]['gt_path'] if isinstance(ds.paths[i], dict) else ds.paths[i]
        name = os.path.splitext(os.path.basename(path))[0]
        random.seed(zlib.crc32(name.encode()))
        out[name] = ds[i]
    return out


def _same(a: dict, b: dict) -> bool:
    assert sorted(a) == sorted(b)
    return all(torch.equal(a[k]['lq'], b[k]['lq']) and torch.equal(a[k]['gt'], b[k]['gt']) for k in a)


def test_lmdb_and_folder_backends_yield_identical_samples(tmp_path, shared_data, car_data, cbsd):
    lmdb_backend = {'type': 'lmdb'}
    # SR: BasicSR's PairedImageDataset on T91 images with LR made by mambair-make-lr
    t91 = tmp_path / 't91'
    t91.mkdir()
    for name in ('t1.bmp', 't2.bmp', 't3.bmp'):
        shutil.copy(shared_data / 'T91' / name, t91)
    assert make_lr.main([str(t91), str(tmp_path / 'lr'), '-s', '2', '--hr-out', str(tmp_path / 'hr'), '-j', '1']) == 0
    assert make_lmdb.main([str(tmp_path / 'hr'), str(tmp_path / 'hr.lmdb'), '-j', '1']) == 0
    assert make_lmdb.main([str(tmp_path / 'lr' / 'X2'), str(tmp_path / 'lr.lmdb'), '--strip-suffix', 'x2',
                           '-j', '1']) == 0
    for phase in ('train', 'val'):
        base = dict(name='sr', type='PairedImageDataset', phase=phase, scale=2, gt_size=64, use_hflip=True,
                    use_rot=True, filename_tmpl='{}x2')
        folder = build_dataset(dict(base, dataroot_gt=str(tmp_path / 'hr'), dataroot_lq=str(tmp_path / 'lr' / 'X2'),
                                    io_backend=DISK))
        packed = build_dataset(dict(base, dataroot_gt=str(tmp_path / 'hr.lmdb'), dataroot_lq=str(tmp_path / 'lr.lmdb'),
                                    io_backend=lmdb_backend))
        assert len(folder) == len(packed) == 3
        assert _same(_pairs(folder, range(3)), _pairs(packed, range(3))), f'SR {phase}'

    # Gaussian denoising: GT-only LMDB
    assert make_lmdb.main([str(cbsd), str(tmp_path / 'cbsd.lmdb'), '-j', '1']) == 0
    for phase in ('train', 'val'):
        torch.manual_seed(3)
        folder = _pairs(noise_set(cbsd, phase=phase), range(4))
        torch.manual_seed(3)
        packed = _pairs(noise_set(tmp_path / 'cbsd.lmdb', phase=phase, io_backend=lmdb_backend), range(4))
        assert _same(folder, packed), f'denoising {phase}'

    # JPEG CAR: pre-generated pairs and on-the-fly
    for sub in ('HQ', 'LQ/10'):
        assert make_lmdb.main([str(car_data / sub), str(tmp_path / (sub.replace('/', '_') + '.lmdb')), '-j', '1']) == 0
    for phase in ('train', 'val'):
        folder = _pairs(jpeg_set(car_data / 'HQ', phase=phase, dataroot_lq=str(car_data / 'LQ' / '10')), range(3))
        packed = _pairs(jpeg_set(tmp_path / 'HQ.lmdb', phase=phase, dataroot_lq=str(tmp_path / 'LQ_10.lmdb'),
                                 io_backend=lmdb_backend), range(3))
        assert _same(folder, packed), f'CAR {phase}'
        torch.manual_seed(5)
        folder = _pairs(jpeg_set(car_data / 'HQ', phase=phase, quality=[10, 40]), range(3))
        torch.manual_seed(5)
        packed = _pairs(jpeg_set(tmp_path / 'HQ.lmdb', phase=phase, quality=[10, 40], io_backend=lmdb_backend),
                        range(3))
        assert _same(folder, packed), f'CAR on the fly {phase}'
