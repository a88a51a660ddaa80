"""Every official option file (MambaIR and MambaIRv2): parses with BasicSR, passes our launcher's checks, builds
its network and datasets on a small copy of the documented ``datasets/`` layout, and keeps the official
hyperparameters."""

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
from basicsr_mambair.presets import PRESETS
from basicsr_mambair.utils.matlab_resize import imresize_matlab

ALL_OPTIONS = sorted((REPO / 'options').glob('*/*.yml'))
ALL_IDS = [p.name for p in ALL_OPTIONS]
# the Gaussian-DN / CAR / SR files of the official MambaIR and MambaIRv2 (real denoising, real-world SR and the
# bicubic baseline have their own tests)
OPTIONS = [p for p in ALL_OPTIONS if not any(k in p.name for k in ('RealDN', 'Bicubic', 'RealES', 'RealSR'))]
OPTION_IDS = [p.name for p in OPTIONS]
# real-world SR (ours: no official files): Real-ESRGAN's two stages and a test file for photos without ground truth
REAL_SR = {'train_MambaIR_RealESRNet_x4.yml', 'train_MambaIR_RealESRGAN_x4.yml', 'test_MambaIR_RealSR_x4.yml'}

# spec section 5: parameters of the official configurations (instantiated official classes), by (family, task)
PARAMS = {('Bicubic', 'SR'): 0, ('MambaIR', 'SR_x2'): 20_421_863, ('MambaIR', 'SR_x3'): 20_606_503,
          ('MambaIR', 'SR_x4'): 20_569_575, ('MambaIR', 'lightSR_x2'): 905_016, ('MambaIR', 'lightSR_x3'): 913_131,
          ('MambaIR', 'lightSR_x4'): 924_492, ('MambaIR', 'ColorDN'): 15_777_507, ('MambaIR', 'CAR'): 15_771_025,
          ('MambaIR', 'RealDN'): 26_779_480, ('MambaIR', 'RealESRNet_x4'): 20_384_935,
          ('MambaIR', 'RealESRGAN_x4'): 20_384_935, ('MambaIR', 'RealSR_x4'): 20_384_935,
          ('MambaIRv2', 'lightSR_x2'): 774_092, ('MambaIRv2', 'lightSR_x3'): 780_587,
          ('MambaIRv2', 'lightSR_x4'): 789_680, ('MambaIRv2', 'SRSmall_x2'): 9_621_935,
          ('MambaIRv2', 'SRSmall_x3'): 9_806_575, ('MambaIRv2', 'SRSmall_x4'): 9_769_647,
          ('MambaIRv2', 'SR_x2'): 22_903_001, ('MambaIRv2', 'SR_x3'): 23_087_641, ('MambaIRv2', 'SR_x4'): 23_050_713,
          ('MambaIRv2', 'SRLarge_x2'): 34_090_523, ('MambaIRv2', 'SRLarge_x3'): 34_275_163,
          ('MambaIRv2', 'SRLarge_x4'): 34_238_235, ('MambaIRv2', 'ColorDN'): 22_657_971,
          ('MambaIRv2', 'CAR'): 22_651_705}

# spec Table B: gt_size, batch/GPU, lr, milestones, total_iter, seed, loss, pretrain (strict), val set
_SR_X2 = ([250000, 400000, 450000, 475000], 500000)
_SR_X3 = ([125000, 200000, 225000, 237500], 250000)
_LONG = ([800000, 1200000, 1400000, 1500000], 1600000)
_SHORT = ([400000, 600000, 700000, 750000], 800000)
TRAIN = {
    ('MambaIR', 'SR_x2'): (128, 4, 2e-4, _SR_X2, 10, 'L1Loss', None, True, 'Set14'),
    ('MambaIR', 'SR_x3'): (192, 8, 1e-4, _SR_X3, 10, 'L1Loss', 'MambaIR_SR_x2.pth', False, 'Set14'),
    ('MambaIR', 'SR_x4'): (192, 4, 1e-4, _SR_X3, 10, 'L1Loss', 'MambaIR_SR_x2.pth', False, 'Set14'),
    ('MambaIR', 'lightSR_x2'): (128, 16, 2e-4, _SR_X2, 10, 'L1Loss', None, True, 'Urban100'),
    ('MambaIR', 'lightSR_x3'): (192, 16, 2e-4, _SR_X2, 10, 'L1Loss', 'MambaIR_lightSR_x2.pth', False, 'Urban100'),
    ('MambaIR', 'lightSR_x4'): (192, 16, 2e-4, _SR_X2, 10, 'L1Loss', 'MambaIR_lightSR_x2.pth', False, 'Urban100'),
    ('MambaIR', 'ColorDN_level15'): (128, 2, 2e-4, _LONG, 10, 'CharbonnierLoss', None, True, 'CBSD68'),
    ('MambaIR', 'ColorDN_level25'): (128, 2, 1e-4, _SHORT, 10, 'CharbonnierLoss', 'MambaIR_ColorDN_level15.pth', True,
                                     'CBSD68'),
    ('MambaIR', 'ColorDN_level50'): (128, 2, 1e-4, _SHORT, 10, 'CharbonnierLoss', 'MambaIR_ColorDN_level15.pth', True,
                                     'CBSD68'),
    ('MambaIR', 'CAR_q10'): (126, 2, 1e-4, _SHORT, 42, 'CharbonnierLoss', 'MambaIR_CAR_q40.pth', True, 'Classic5'),
    ('MambaIR', 'CAR_q30'): (126, 2, 1e-4, _SHORT, 42, 'CharbonnierLoss', 'MambaIR_CAR_q40.pth', True, 'Classic5'),
    ('MambaIR', 'CAR_q40'): (126, 2, 2e-4, _LONG, 42, 'CharbonnierLoss', None, True, 'Classic5'),
    ('MambaIRv2', 'lightSR_x2'): (128, 16, 2e-4, _SR_X2, 10, 'L1Loss', None, True, 'Set14'),
    ('MambaIRv2', 'lightSR_x3'): (192, 16, 2e-4, _SR_X2, 10, 'L1Loss', None, False, 'Set14'),
    ('MambaIRv2', 'lightSR_x4'): (192, 16, 2e-4, _SR_X2, 10, 'L1Loss', None, False, 'Set14'),
    **{('MambaIRv2', f'{name}_x2'): (128, 4, 1e-3, _SR_X2, 10, 'L1Loss', None, True, 'Set14')
       for name in ('SRSmall', 'SR', 'SRLarge')},
    **{('MambaIRv2', f'{name}_x{s}'): (192, 4, 1e-4, _SR_X3, 10, 'L1Loss', f'mambairv2_classicSR_{size}_x2.pth', False,
                                       'Set14')
       for name, size in (('SRSmall', 'Small'), ('SR', 'Base'), ('SRLarge', 'Large')) for s in (3, 4)},
    ('MambaIRv2', 'ColorDN_level15'): (128, 2, 2e-4, _LONG, 10, 'CharbonnierLoss', None, True, 'CBSD68'),
    **{('MambaIRv2', f'ColorDN_level{n}'): (128, 2, 1e-4, _SHORT, 10, 'CharbonnierLoss', 'mambairv2_ColorDN_15.pth',
                                            True, 'CBSD68') for n in (25, 50)},
    **{('MambaIRv2', f'CAR_q{q}'): (126, 2, 1e-4, _SHORT, 42, 'CharbonnierLoss', 'mambairv2_jpeg_q40.pth', False,
                                    'Classic5') for q in (10, 30)},
    ('MambaIRv2', 'CAR_q40'): (126, 2, 2e-4, _LONG, 42, 'CharbonnierLoss', None, True, 'Classic5'),
}
SR_SETS = ['Set5', 'Set14', 'B100', 'Urban100', 'Manga109']
V2_TASKS = ([f'lightSR_x{s}' for s in (2, 3, 4)] + [f'{n}_x{s}' for n in ('SRSmall', 'SR', 'SRLarge')
                                                    for s in (2, 3, 4)]
            + [f'ColorDN_level{n}' for n in (15, 25, 50)] + [f'CAR_q{q}' for q in (10, 30, 40)])


def family_and_task(path: Path) -> tuple[str, str]:
    """('MambaIR' | 'MambaIRv2' | 'Bicubic', task) of an option file name."""
    family, task = re.match(r'(?:train|test)_(MambaIRv2|MambaIR|Bicubic)_(.+)\.yml$', path.name).groups()
    return family, task


def kind_of(task: str) -> str:
    """'SR' (classic, any size), 'lightSR', 'ColorDN', 'CAR' or 'RealDN'."""
    kind = task.split('_')[0]
    return 'SR' if kind.startswith('SR') else kind


def metric_convention(task: str) -> tuple[int, bool]:
    """spec Table C: (crop_border, test_y_channel)."""
    if 'SR' in task:
        return int(task[-1]), True
    return 0, kind_of(task) == 'CAR'


def v2_preset(task: str) -> str:
    """Our preset name of a MambaIRv2 option file's task (``SRSmall_x2`` -> ``v2_classicSR_Small_x2``)."""
    kind, rest = task.split('_', 1)
    names = {'SRSmall': f'classicSR_Small_{rest}', 'SR': f'classicSR_Base_{rest}', 'SRLarge': f'classicSR_Large_{rest}',
             'lightSR': task, 'ColorDN': f'colorDN_{rest[-2:]}', 'CAR': f'CAR_{rest[1:]}'}
    return f'v2_{names[kind]}'


def released_weights(family: str, task: str) -> str:
    """The file a test option file reads from experiments/pretrained_models/ (its README lists them)."""
    if family == 'MambaIR':
        return f'MambaIR_{task}.pth'
    preset = PRESETS[v2_preset(task)]
    if preset.task == 'SR':
        return f'mambairv2_{preset.name[3:]}.pth'  # mambairv2_lightSR_x2, mambairv2_classicSR_Base_x3, ...
    if preset.task == 'CAR':
        return f'mambairv2_jpeg_q{preset.jpeg_quality}.pth'
    return f'mambairv2_ColorDN_{preset.noise}.pth'


def test_every_official_task_has_train_and_test_files():
    tasks = [f'SR_x{s}' for s in (2, 3, 4)] + [f'lightSR_x{s}' for s in (2, 3, 4)]
    tasks += [f'ColorDN_level{n}' for n in (15, 25, 50)] + [f'CAR_q{q}' for q in (10, 30, 40)]
    expected = [f'{phase}_MambaIR_{t}.yml' for t in tasks for phase in ('train', 'test')]
    expected += [f'{phase}_MambaIRv2_{t}.yml' for t in V2_TASKS for phase in ('train', 'test')]
    assert OPTION_IDS == sorted(expected)
    assert len(OPTIONS) == 24 + 36 and len(ALL_OPTIONS) > 60
    names = [yaml.safe_load(p.read_text())['name'] for p in ALL_OPTIONS]
    assert len(set(names)) == len(names), 'two runs would share experiments/<name>'  # (official Small/Large do)


def _roots(opt: dict) -> list[str]:
    return [ds[key] for ds in opt['datasets'].values() for key in ('dataroot_gt', 'dataroot_lq') if key in ds]


@pytest.mark.parametrize('path', OPTIONS, ids=OPTION_IDS)
def test_official_hyperparameters(path):
    opt = yaml.safe_load(path.read_text())
    family, task = family_and_task(path)
    scale = int(task[-1]) if 'SR' in task else 1
    net = opt['network_g']
    if family == 'MambaIR':
        assert opt['model_type'] == 'MambaIRModel' and net['type'] == 'MambaIR'
    else:  # the official network_g exactly (spec Table A), and the routing choice visible
        light = kind_of(task) == 'lightSR'
        assert opt['model_type'] == ('MambaIRv2LightModel' if light else 'MambaIRv2Model')
        assert net == {**PRESETS[v2_preset(task)].network_g(), 'routing': None}
    assert opt['num_gpu'] == 'auto'
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
        gt, bs, lr, (milestones, total), seed, loss, pretrain, strict, val_set = TRAIN[family, task]
        workers = 8 if (family, kind_of(task)) == ('MambaIRv2', 'lightSR') else 32
        train_ds = opt['datasets']['train']
        assert (train_ds['gt_size'], train_ds['batch_size_per_gpu']) == (gt, bs)
        assert (train_ds['use_hflip'], train_ds['use_rot'], train_ds['use_shuffle']) == (True, True, True)
        assert (train_ds['num_worker_per_gpu'], train_ds['dataset_enlarge_ratio']) == (workers, 100)
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
        assert opt['path'] == {'pretrain_network_g': f'experiments/pretrained_models/{released_weights(family, task)}',
                               'strict_load_g': True}
        assert opt['val']['suffix'] is None and opt['val']['pbar'] is True and 'save_img' in opt['val']


def test_released_v2_weights_are_documented():
    """Every weight file a v2 option file reads is named in experiments/pretrained_models/README.md."""
    readme = (REPO / 'experiments' / 'pretrained_models' / 'README.md').read_text()
    for path in OPTIONS:
        weights = yaml.safe_load(path.read_text())['path']['pretrain_network_g']
        if 'MambaIRv2' in path.name and weights:
            name = Path(weights).name
            small_large = re.sub(r'_(Small|Large)_x[34]\.pth$', r'_\1_x2.pth', name)  # listed as '(x3, x4 alike)'
            assert f'`{name}`' in readme or f'`{small_large}` (x3, x4 alike)' in readme, name


# Real-ESRGAN's published recipe (options/train_realesr{net,gan}_x4plus.yml of xinntao/Real-ESRGAN, kept by HAT's
# train_Real_HAT_SRx4_mse_model.yml / train_Real_HAT_GAN_SRx4_finetune_from_mse_model.yml)
REAL_ESRGAN_DEGRADATIONS = {
    'resize_prob': [0.2, 0.7, 0.1], 'resize_range': [0.15, 1.5], 'gaussian_noise_prob': 0.5, 'noise_range': [1, 30],
    'poisson_scale_range': [0.05, 3], 'gray_noise_prob': 0.4, 'jpeg_range': [30, 95], 'second_blur_prob': 0.8,
    'resize_prob2': [0.3, 0.4, 0.3], 'resize_range2': [0.3, 1.2], 'gaussian_noise_prob2': 0.5, 'noise_range2': [1, 25],
    'poisson_scale_range2': [0.05, 2.5], 'gray_noise_prob2': 0.4, 'jpeg_range2': [30, 95], 'gt_size': 256,
    'queue_size': 180}
_KERNELS = ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
REAL_ESRGAN_DATASET = {
    'type': 'RealESRGANDataset', 'io_backend': {'type': 'disk'}, 'blur_kernel_size': 21, 'kernel_list': _KERNELS,
    'kernel_prob': [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], 'sinc_prob': 0.1, 'blur_sigma': [0.2, 3],
    'betag_range': [0.5, 4], 'betap_range': [1, 2], 'blur_kernel_size2': 21, 'kernel_list2': _KERNELS,
    'kernel_prob2': [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], 'sinc_prob2': 0.1, 'blur_sigma2': [0.2, 1.5],
    'betag_range2': [0.5, 4], 'betap_range2': [1, 2], 'final_sinc_prob': 0.8, 'gt_size': 256, 'use_hflip': True,
    'use_rot': False, 'use_shuffle': True, 'num_worker_per_gpu': 5, 'batch_size_per_gpu': 4,  # HAT's batch
    'dataset_enlarge_ratio': 1, 'prefetch_mode': None}
ADAM_1E4 = {'type': 'Adam', 'lr': 1e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]}  # HAT's lr (Real-ESRNet: 2e-4)
REAL_ESRGAN_LOSSES = {
    'perceptual_opt': {'type': 'PerceptualLoss', 'layer_weights': {'conv1_2': 0.1, 'conv2_2': 0.1, 'conv3_4': 1,
                                                                   'conv4_4': 1, 'conv5_4': 1},
                       'vgg_type': 'vgg19', 'use_input_norm': True, 'perceptual_weight': 1.0, 'style_weight': 0,
                       'range_norm': False, 'criterion': 'l1'},
    'gan_opt': {'type': 'GANLoss', 'gan_type': 'vanilla', 'real_label_val': 1.0, 'fake_label_val': 0.0,
                'loss_weight': 0.1},
    'net_d_iters': 1, 'net_d_init_iters': 0}


def test_real_sr_files_follow_real_esrgan_and_hat():
    from basicsr_mambair.presets import get_preset

    network = get_preset('realSR_x4').network_g()
    assert {p.name for p in ALL_OPTIONS if 'RealES' in p.name or 'RealSR' in p.name} == REAL_SR
    stage1, stage2 = (yaml.safe_load((REPO / 'options' / 'train' / f'train_MambaIR_{s}_x4.yml').read_text())
                      for s in ('RealESRNet', 'RealESRGAN'))
    for opt, model in ((stage1, 'MambaIRRealESRNetModel'), (stage2, 'MambaIRRealESRGANModel')):
        assert (opt['model_type'], opt['scale'], opt['num_gpu'], opt['manual_seed']) == (model, 4, 'auto', 0)
        assert {k: opt[k] for k in REAL_ESRGAN_DEGRADATIONS} == REAL_ESRGAN_DEGRADATIONS
        train_ds = opt['datasets']['train']
        assert {k: train_ds[k] for k in REAL_ESRGAN_DATASET} == REAL_ESRGAN_DATASET
        assert train_ds['dataroot_gt'] == 'datasets/DF2K_OST'
        assert train_ds['meta_info'] == 'datasets/DF2K_OST/meta_info.txt'
        assert opt['network_g'] == network  # the realSR_x4 preset
        t = opt['train']
        assert (t['ema_decay'], t['optim_g'], t['warmup_iter']) == (0.999, ADAM_1E4, -1)
        assert t['pixel_opt'] == {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}
        assert opt['path']['param_key_g'] == 'params_ema' and opt['path']['strict_load_g'] is True
        assert opt['logger']['save_checkpoint_freq'] == 1e4 and 'val' not in opt  # validation: commented out
    assert stage1['gt_usm'] is True and (stage2['l1_gt_usm'], stage2['percep_gt_usm'], stage2['gan_gt_usm']) == (
        True, True, False)
    assert stage1['train']['scheduler'] == {'type': 'MultiStepLR', 'milestones': [1000000], 'gamma': 0.5}
    assert stage1['train']['total_iter'] == 1000000 and stage1['path']['pretrain_network_g'] is None
    assert stage2['train']['scheduler'] == {'type': 'MultiStepLR', 'milestones': [400000], 'gamma': 0.5}
    assert stage2['train']['total_iter'] == 400000 and stage2['train']['optim_d'] == ADAM_1E4
    assert {k: stage2['train'][k] for k in REAL_ESRGAN_LOSSES} == REAL_ESRGAN_LOSSES
    assert stage2['network_d'] == {'type': 'UNetDiscriminatorSN', 'num_in_ch': 3, 'num_feat': 64,
                                   'skip_connection': True}
    # stage 2 starts from stage 1's output, by a path relative to the working directory
    assert stage2['path']['pretrain_network_g'] == f'experiments/{stage1["name"]}/models/net_g_latest.pth'

    test = yaml.safe_load((REPO / 'options' / 'test' / 'test_MambaIR_RealSR_x4.yml').read_text())
    assert test['network_g'] == network and test['model_type'] == 'MambaIRModel'
    assert test['datasets'] == {'test_1': {'name': 'RealSRSet', 'type': 'SingleImageDataset',
                                           'dataroot_lq': 'datasets/RealSRSet', 'io_backend': {'type': 'disk'}}}
    assert test['val']['metrics'] == {'niqe': {'type': 'calculate_niqe', 'crop_border': 4, 'better': 'lower'}}
    assert test['val']['save_img'] is True and test['val']['tile']
    assert test['path']['pretrain_network_g'] == 'experiments/pretrained_models/MambaIR_RealSR_x4.pth'


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
            if 'meta_info' in ds:  # RealESRGANDataset: HR images listed in a meta-info file
                (root / ds['meta_info']).parent.mkdir(parents=True, exist_ok=True)
                (root / ds['meta_info']).write_text(''.join(f'{name}.png\n' for name in crops))
            if 'dataroot_gt' not in ds:  # SingleImageDataset: LQ images only
                for name, img in crops.items():
                    _write(root / ds['dataroot_lq'] / f'{name}.png', img)
                continue
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
    # the perceptual loss's VGG19 weights where BasicSR looks first (the option check only needs the file)
    (root / 'experiments' / 'pretrained_models' / 'vgg19-dcbb9e9d.pth').touch()
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

    family, task = family_and_task(path)
    key = kind_of(task) if kind_of(task) in ('ColorDN', 'CAR', 'RealDN') else task
    key = 'SR' if family == 'Bicubic' else key
    config = repr(sorted(opt['network_g'].items()))  # build each distinct network_g once (34M-param nets are slow)
    if config not in _NETWORKS:
        _NETWORKS[config] = sum(p.numel() for p in build_network(opt['network_g']).parameters())
    assert _NETWORKS[config] == PARAMS[family, key]

    in_chans = opt['network_g'].get('in_chans', opt['network_g'].get('inp_channels', 3))  # Bicubic: RGB
    scale = opt['scale']
    for phase, ds_opt in opt['datasets'].items():
        dataset = build_dataset(ds_opt)
        assert len(dataset) == 2, phase
        item = dataset[0]
        if ds_opt['type'] == 'RealESRGANDataset':  # HR only (padded to BasicSR's 400) and the blur kernels
            assert tuple(item['gt'].shape) == (3, 400, 400) and tuple(item['kernel1'].shape) == (21, 21)
            continue
        if ds_opt['type'] == 'SingleImageDataset':  # real photos: no ground truth
            assert 'gt' not in item and tuple(item['lq'].shape) == (3, 384, 384)
            continue
        lq, gt = item['lq'], item['gt']
        assert lq.shape[0] == gt.shape[0] == in_chans, phase
        assert gt.shape[1:] == (lq.shape[1] * scale, lq.shape[2] * scale)
        if phase == 'train':
            assert gt.shape[1:] == (ds_opt['gt_size'],) * 2
