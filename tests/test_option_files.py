"""Every official option file: parses with BasicSR, passes our launcher's checks, builds its network and
datasets on a small copy of the documented ``datasets/`` layout, and keeps the official hyperparameters."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from helpers import REPO

from basicsr_mambair.data.util import encode_jpeg
from basicsr_mambair.utils.matlab_resize import imresize_matlab

ALL_OPTIONS = sorted((REPO / 'options').glob('*/*.yml'))
ALL_IDS = [p.name for p in ALL_OPTIONS]
# the Gaussian-DN / CAR / SR files of the official MambaIR (real denoising and the bicubic baseline have their
# own tests)
OPTIONS = [p for p in ALL_OPTIONS if 'RealDN' not in p.name and 'Bicubic' not in p.name]
OPTION_IDS = [p.name for p in OPTIONS]

# spec section 5: parameters of the official configurations (instantiated official classes)
PARAMS = {'Bicubic': 0, 'SR_x2': 20_421_863, 'SR_x3': 20_606_503, 'SR_x4': 20_569_575, 'lightSR_x2': 905_016,
          'lightSR_x3': 913_131, 'lightSR_x4': 924_492, 'ColorDN': 15_777_507, 'CAR': 15_771_025,
          'RealDN': 26_779_480}

# spec Table B: gt_size, batch/GPU, lr, milestones, total_iter, seed, loss, pretrain (strict), val set
_SR_X2 = ([250000, 400000, 450000, 475000], 500000)
_SR_X3 = ([125000, 200000, 225000, 237500], 250000)
_LONG = ([800000, 1200000, 1400000, 1500000], 1600000)
_SHORT = ([400000, 600000, 700000, 750000], 800000)
TRAIN = {
    'SR_x2': (128, 4, 2e-4, _SR_X2, 10, 'L1Loss', None, True, 'Set14'),
    'SR_x3': (192, 8, 1e-4, _SR_X3, 10, 'L1Loss', 'MambaIR_SR_x2.pth', False, 'Set14'),
    'SR_x4': (192, 4, 1e-4, _SR_X3, 10, 'L1Loss', 'MambaIR_SR_x2.pth', False, 'Set14'),
    'lightSR_x2': (128, 16, 2e-4, _SR_X2, 10, 'L1Loss', None, True, 'Urban100'),
    'lightSR_x3': (192, 16, 2e-4, _SR_X2, 10, 'L1Loss', 'MambaIR_lightSR_x2.pth', False, 'Urban100'),
    'lightSR_x4': (192, 16, 2e-4, _SR_X2, 10, 'L1Loss', 'MambaIR_lightSR_x2.pth', False, 'Urban100'),
    'ColorDN_level15': (128, 2, 2e-4, _LONG, 10, 'CharbonnierLoss', None, True, 'CBSD68'),
    'ColorDN_level25': (128, 2, 1e-4, _SHORT, 10, 'CharbonnierLoss', 'MambaIR_ColorDN_level15.pth', True, 'CBSD68'),
    'ColorDN_level50': (128, 2, 1e-4, _SHORT, 10, 'CharbonnierLoss', 'MambaIR_ColorDN_level15.pth', True, 'CBSD68'),
    'CAR_q10': (126, 2, 1e-4, _SHORT, 42, 'CharbonnierLoss', 'MambaIR_CAR_q40.pth', True, 'Classic5'),
    'CAR_q30': (126, 2, 1e-4, _SHORT, 42, 'CharbonnierLoss', 'MambaIR_CAR_q40.pth', True, 'Classic5'),
    'CAR_q40': (126, 2, 2e-4, _LONG, 42, 'CharbonnierLoss', None, True, 'Classic5'),
}
SR_SETS = ['Set5', 'Set14', 'B100', 'Urban100', 'Manga109']


def task_of(path: Path) -> str:
    return re.match(r'(?:train|test)_(?:MambaIR|Bicubic)_(.+)\.yml$', path.name).group(1)


def kind_of(task: str) -> str:
    return task.split('_')[0]


def metric_convention(task: str) -> tuple[int, bool]:
    """spec Table C: (crop_border, test_y_channel)."""
    if 'SR' in task:
        return int(task[-1]), True
    return 0, kind_of(task) == 'CAR'


def test_every_official_task_has_train_and_test_files():
    tasks = [f'SR_x{s}' for s in (2, 3, 4)] + [f'lightSR_x{s}' for s in (2, 3, 4)]
    tasks += [f'ColorDN_level{n}' for n in (15, 25, 50)] + [f'CAR_q{q}' for q in (10, 30, 40)]
    assert OPTION_IDS == sorted([f'test_MambaIR_{t}.yml' for t in tasks] + [f'train_MambaIR_{t}.yml' for t in tasks])
    assert len(OPTIONS) == 24 and len(ALL_OPTIONS) > 24


def _roots(opt: dict) -> list[str]:
    return [ds[key] for ds in opt['datasets'].values() for key in ('dataroot_gt', 'dataroot_lq') if key in ds]


@pytest.mark.parametrize('path', OPTIONS, ids=OPTION_IDS)
def test_official_hyperparameters(path):
    opt = yaml.safe_load(path.read_text())
    task = task_of(path)
    scale = int(task[-1]) if 'SR' in task else 1
    net = opt['network_g']
    assert opt['model_type'] == 'MambaIRModel' and net['type'] == 'MambaIR' and opt['num_gpu'] == 'auto'
    assert opt['scale'] == scale and net['upscale'] == scale
    assert all(root.startswith('datasets/') and '..' not in root for root in _roots(opt)), 'relative roots'
    assert '/home/' not in path.read_text() and '/data' not in path.read_text().replace('datasets/', '')
    for ds in opt['datasets'].values():
        assert ds['type'] == {'SR': 'PairedImageDataset', 'lightSR': 'PairedImageDataset', 'ColorDN':
                              'GaussianNoiseDataset', 'CAR': 'JPEGArtifactDataset'}[kind_of(task)]
        assert 'task' not in ds and ds['io_backend'] == {'type': 'disk'}
        if kind_of(task) == 'ColorDN':
            assert ds['noise'] == int(task[-2:]) and 'dataroot_lq' not in ds
        if kind_of(task) == 'CAR':
            assert ds['dataroot_lq'].endswith(f'/LQ/{task[-2:]}')
        if 'SR' in task:
            assert ds['filename_tmpl'] == f'{{}}x{scale}' and ds['dataroot_lq'].endswith(f'LR_bicubic/X{scale}')
    crop, y = metric_convention(task)
    metrics = opt['val']['metrics']
    assert opt['val']['tile_mode'] == 'official'
    is_train = path.name.startswith('train_')
    assert sorted(metrics) == (['psnr'] if is_train else ['psnr', 'ssim'])
    for name, metric in metrics.items():
        assert metric == {'type': f'calculate_{name}', 'crop_border': crop, 'test_y_channel': y}
    if 'prefetch_mode' in str(opt):
        assert all(ds.get('prefetch_mode') is None for ds in opt['datasets'].values())

    if is_train:
        gt, bs, lr, (milestones, total), seed, loss, pretrain, strict, val_set = TRAIN[task]
        train_ds = opt['datasets']['train']
        assert (train_ds['gt_size'], train_ds['batch_size_per_gpu']) == (gt, bs)
        assert (train_ds['use_hflip'], train_ds['use_rot'], train_ds['use_shuffle']) == (True, True, True)
        assert (train_ds['num_worker_per_gpu'], train_ds['dataset_enlarge_ratio']) == (32, 100)
        assert opt['datasets']['val']['name'] == val_set and opt['manual_seed'] == seed
        t = opt['train']
        assert t['optim_g'] == {'type': 'Adam', 'lr': lr, 'weight_decay': 0, 'betas': [0.9, 0.99]}
        assert t['scheduler'] == {'type': 'MultiStepLR', 'milestones': milestones, 'gamma': 0.5}
        assert (t['total_iter'], t['warmup_iter']) == (total, -1)
        expected_loss = {'type': loss, 'loss_weight': 1.0, 'reduction': 'mean'}
        if loss == 'CharbonnierLoss':
            expected_loss['eps'] = 1e-3
        assert t['pixel_opt'] == expected_loss
        assert opt['val']['val_freq'] == 5000 and opt['logger']['save_checkpoint_freq'] == 5000
        weights = opt['path']['pretrain_network_g']
        assert (weights and Path(weights).name) == pretrain and opt['path']['strict_load_g'] == strict
        if pretrain:
            assert weights == f'experiments/pretrained_models/{pretrain}'
    else:
        names = [ds['name'] for ds in opt['datasets'].values()]
        assert names == {'SR': SR_SETS, 'lightSR': SR_SETS, 'ColorDN': ['CBSD68', 'Kodak24', 'McMaster', 'Urban100'],
                         'CAR': ['Classic5', 'LIVE1']}[kind_of(task)]
        assert list(opt['datasets']) == [f'test_{i + 1}' for i in range(len(names))]
        assert opt['path'] == {'pretrain_network_g': f'experiments/pretrained_models/MambaIR_{task}.pth',
                               'strict_load_g': True}
        assert opt['val']['suffix'] is None and opt['val']['pbar'] is True and 'save_img' in opt['val']


def test_every_data_root_is_documented():
    readme = (REPO / 'datasets' / 'README.md').read_text()
    for path in ALL_OPTIONS:
        for root in _roots(yaml.safe_load(path.read_text())):
            parts = Path(root).parts[1:]  # without 'datasets'
            assert f'├── {parts[0]}/' in readme or f'└── {parts[0]}/' in readme, root
            for part in parts[1:]:
                assert part in readme or part.rstrip('0123456789') in readme, (path.name, root)


# ----------------------------------------------------------------- a miniature datasets/ tree
def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == '.jpg':
        path.write_bytes(encode_jpeg(img, int(path.parent.name)))
    else:
        assert cv2.imwrite(str(path), img)


@pytest.fixture(scope='module')
def mini_root(tmp_path_factory, shared_data) -> Path:
    """Every root the option files name, filled with two real 384x384 crops (or their LR / JPEG versions),
    plus placeholder files for the pretrained weights they name."""
    root = tmp_path_factory.mktemp('mini')
    kodak = shared_data / 'Kodak24' / 'full_768x512'
    crops = {f'k{i}': cv2.imread(str(kodak / f'kodim0{i}.png'))[64:448, 192:576] for i in (1, 2)}
    for path in ALL_OPTIONS:
        opt = yaml.safe_load(path.read_text())
        scale = opt['scale']
        for ds in opt['datasets'].values():
            gt_root, lq_root = root / ds['dataroot_gt'], ds.get('dataroot_lq')
            for name, img in crops.items():
                if ds['type'] == 'JPEGArtifactDataset':
                    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
                    _write(gt_root / f'{name}.png', gray)
                    _write(root / lq_root / f'{name}.jpg', gray)
                else:
                    _write(gt_root / f'{name}.png', img)
                    if lq_root is not None:
                        lq = imresize_matlab(img, scale) if scale > 1 else img
                        _write(root / lq_root / f'{ds["filename_tmpl"].format(name)}.png', lq)
        weights = (opt.get('path') or {}).get('pretrain_network_g')
        if weights:
            (root / weights).parent.mkdir(parents=True, exist_ok=True)
            (root / weights).touch()
    return root


_NETWORKS: dict[str, int] = {}


@pytest.mark.parametrize('path', ALL_OPTIONS, ids=ALL_IDS)
def test_parses_checks_and_builds(path, mini_root, monkeypatch):
    from basicsr.archs import build_network
    from basicsr.data import build_dataset
    from basicsr.utils.options import parse_options

    from basicsr_mambair.options import check_options, read_option_file

    is_train = path.name.startswith('train_')
    monkeypatch.chdir(mini_root)  # the roots are relative to the working directory
    check_options(read_option_file(str(path)), str(path), is_train)
    monkeypatch.setattr(sys, 'argv', ['mambair', '-opt', str(path)])
    opt, _ = parse_options(str(mini_root), is_train=is_train)

    task = task_of(path)
    key = kind_of(task) if kind_of(task) in ('ColorDN', 'CAR', 'RealDN') else task
    key = 'Bicubic' if 'Bicubic' in path.name else key
    config = repr(sorted(opt['network_g'].items()))  # build each distinct network_g once
    if config not in _NETWORKS:
        _NETWORKS[config] = sum(p.numel() for p in build_network(opt['network_g']).parameters())
    assert _NETWORKS[config] == PARAMS[key]

    in_chans = opt['network_g'].get('in_chans', opt['network_g'].get('inp_channels', 3))  # Bicubic: RGB
    scale = opt['scale']
    for phase, ds_opt in opt['datasets'].items():
        dataset = build_dataset(ds_opt)
        assert len(dataset) == 2, phase
        item = dataset[0]
        lq, gt = item['lq'], item['gt']
        assert lq.shape[0] == gt.shape[0] == in_chans, phase
        assert gt.shape[1:] == (lq.shape[1] * scale, lq.shape[2] * scale)
        if phase == 'train':
            assert gt.shape[1:] == (ds_opt['gt_size'],) * 2
