"""Short real training runs through ``mambair-train`` for each task family, with a tiny MambaIR, and a tiny
MambaIRv2 from its shipped option file (with ``--auto_resume``).

Data prepared with our tools from real benchmark images: SR T91 -> Set5 (official LR files),
colour Gaussian denoising on CBSD68 crops, grayscale JPEG CAR on LIVE1 crops. Each run validates
twice with the final weights (at the last iteration and after saving ``net_g_latest``): the two
logged PSNR/SSIM values must agree, and must equal the values recomputed here from that
checkpoint and inputs made independently, the official way (official LR files, ``np.random.seed(0)``
noise, OpenCV grayscale JPEG decoding).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import run_cli
from tiny_experiments import load_options, write_options

from basicsr_mambair.cli import make_jpeg, make_lr

# channel attention squeezes by 30: 30 channels is the smallest width the CAB allows. Training crops
# stay small (LQ 16-24 px): the CPU scan's cost grows quickly with the number of pixels.
TINY = dict(type='MambaIR', embed_dim=30, depths=[1], d_state=4, mlp_ratio=1.0)


def _options(name: str, scale: int, network: dict, train: dict, val: dict, crop_border: int, y: bool,
             loss: str, total_iter: int = 6) -> dict:
    train = dict(train, name='train', num_worker_per_gpu=0, batch_size_per_gpu=2,
                 dataset_enlarge_ratio=1, use_shuffle=True, use_hflip=True, use_rot=True, prefetch_mode=None,
                 io_backend={'type': 'disk'})
    val = dict(val, io_backend={'type': 'disk'})
    pixel = {'type': loss, 'loss_weight': 1.0, 'reduction': 'mean'}
    if loss == 'CharbonnierLoss':
        pixel['eps'] = 1e-3
    metric = {'crop_border': crop_border, 'test_y_channel': y}
    return dict(
        name=name, model_type='MambaIRModel', scale=scale, num_gpu='auto', manual_seed=10,
        datasets={'train': train, 'val': val},
        network_g=dict(TINY, **network),
        path={'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        train={'optim_g': {'type': 'Adam', 'lr': 2e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]},
               'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5},
               'total_iter': total_iter, 'warmup_iter': -1, 'pixel_opt': pixel},
        val={'val_freq': total_iter, 'save_img': False, 'tile_mode': 'official',
             'metrics': {'psnr': dict(type='calculate_psnr', **metric), 'ssim': dict(type='calculate_ssim', **metric)}},
        logger={'print_freq': 2, 'save_checkpoint_freq': total_iter, 'use_tb_logger': False},
    )


def _train(tmp_path: Path, opt: dict) -> tuple[list[dict[str, float]], Path]:
    """Run mambair-train; return the logged validation metrics (one dict per validation) and the run folder."""
    yml = write_options(tmp_path / f'{opt["name"]}.yml', opt)
    run_cli('mambair-train', '-opt', str(yml), cwd=tmp_path, timeout=300)
    run_dir = tmp_path / 'experiments' / opt['name']
    log = next(run_dir.glob('train_*.log')).read_text()
    name = opt['datasets']['val']['name']
    blocks = re.findall(rf'Validation {name}\n((?:\t # \w+: [-\d.]+.*\n)+)', log)
    vals = [{m: float(v) for m, v in re.findall(r'# (\w+): ([-\d.]+)', block)} for block in blocks]
    assert len(vals) == 2, log[-3000:]
    assert (run_dir / 'models' / 'net_g_latest.pth').is_file()
    return vals, run_dir


def _recompute(opt: dict, run_dir: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean PSNR/SSIM of the saved final network on (lq float HxWxC BGR, gt uint8 HxWxC) pairs, independently."""
    from basicsr.archs import build_network
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils import img2tensor, tensor2img

    net = build_network(dict(opt['network_g']))
    net.load_state_dict(torch.load(run_dir / 'models' / 'net_g_latest.pth', weights_only=True)['params'])
    net.eval()
    metric = opt['val']['metrics']['psnr']
    psnr, ssim = [], []
    for lq, gt in pairs:
        assert max(lq.shape[:2]) < 200  # the official tiling uses a single tile: a plain forward
        with torch.no_grad():
            out = tensor2img([net(img2tensor(lq, bgr2rgb=True, float32=True)[None])[0]])
        kwargs = dict(crop_border=metric['crop_border'], test_y_channel=metric['test_y_channel'])
        psnr.append(calculate_psnr(out, gt, **kwargs))
        ssim.append(calculate_ssim(out, gt, **kwargs))
    return {'psnr': float(np.mean(psnr)), 'ssim': float(np.mean(ssim))}


def _check(vals: list[dict[str, float]], recomputed: dict[str, float], psnr_range: tuple[float, float]) -> None:
    assert vals[0] == vals[1], 'validating the same weights twice must give the same numbers'
    assert set(vals[0]) == {'psnr', 'ssim'}
    assert psnr_range[0] < vals[0]['psnr'] < psnr_range[1] and 0 < vals[0]['ssim'] < 1, vals
    assert vals[0]['psnr'] == pytest.approx(recomputed['psnr'], abs=6e-5)
    assert vals[0]['ssim'] == pytest.approx(recomputed['ssim'], abs=6e-5)


def _crops(paths, size: int, flag: int = cv2.IMREAD_COLOR) -> dict[str, np.ndarray]:
    """Centre crops of real images."""
    out = {}
    for path in paths:
        img = cv2.imread(str(path), flag)
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        out[path.stem] = np.ascontiguousarray(img[top:top + size, left:left + size])
    return out


def test_sr_t91_to_set5(tmp_path, shared_data):
    """x4 SR: T91 LR made by mambair-make-lr (mod-cropped HR beside it); validation on Set5 with its
    official LR_bicubic/X4 files."""
    assert make_lr.main([str(shared_data / 'T91'), str(tmp_path / 'T91_LR'), '-s', '4', '--hr-out',
                         str(tmp_path / 'T91_HR'), '-j', '2']) == 0
    set5 = shared_data / 'Set5'
    opt = _options(
        'sr_t91', 4, {'upscale': 4, 'in_chans': 3, 'upsampler': 'pixelshuffledirect'},
        train={'type': 'PairedImageDataset', 'dataroot_gt': str(tmp_path / 'T91_HR'),
               'dataroot_lq': str(tmp_path / 'T91_LR' / 'X4'), 'filename_tmpl': '{}x4', 'gt_size': 64},
        val={'name': 'Set5', 'type': 'PairedImageDataset', 'dataroot_gt': str(set5 / 'HR'),
             'dataroot_lq': str(set5 / 'LR_bicubic' / 'X4'), 'filename_tmpl': '{}x4'},
        crop_border=4, y=True, loss='L1Loss')
    vals, run_dir = _train(tmp_path, opt)
    pairs = []
    for hr_path in sorted((set5 / 'HR').glob('*.png')):
        lr = cv2.imread(str(set5 / 'LR_bicubic' / 'X4' / f'{hr_path.stem}x4.png')).astype(np.float32) / 255
        hr = cv2.imread(str(hr_path))[:lr.shape[0] * 4, :lr.shape[1] * 4]
        pairs.append((lr, hr))
    _check(vals, _recompute(opt, run_dir, pairs), (5, 40))


def test_color_denoising_cbsd68(tmp_path, shared_data):
    """sigma 25 on CBSD68 crops: fresh noise in training, the official fixed noise in validation."""
    images = sorted((shared_data / 'CBSD68').glob('*.png'))
    for folder, paths in (('train', images[:8]), ('val', images[8:11])):
        (tmp_path / folder).mkdir()
        for name, img in _crops(paths, 96).items():
            cv2.imwrite(str(tmp_path / folder / f'{name}.png'), img)
    opt = _options(
        'dn_cbsd68', 1, {'upscale': 1, 'in_chans': 3},
        train={'type': 'GaussianNoiseDataset', 'dataroot_gt': str(tmp_path / 'train'), 'noise': 25, 'gt_size': 24},
        val={'name': 'CBSD68', 'type': 'GaussianNoiseDataset', 'dataroot_gt': str(tmp_path / 'val'), 'noise': 25},
        crop_border=0, y=False, loss='CharbonnierLoss')
    vals, run_dir = _train(tmp_path, opt)
    pairs = []
    for path in sorted((tmp_path / 'val').glob('*.png')):
        gt = cv2.imread(str(path))
        state = np.random.get_state()
        np.random.seed(seed=0)  # the official validation noise
        lq = gt.astype(np.float32) / 255 + np.random.normal(0, 25 / 255, gt.shape)
        np.random.set_state(state)
        pairs.append((lq, gt))
    _check(vals, _recompute(opt, run_dir, pairs), (5, 40))


def test_jpeg_car_live1_gray(tmp_path, shared_data):
    """Grayscale CAR: training JPEGs encoded on the fly at q in [10, 40]; validation on pre-generated q10
    JPEGs (mambair-make-jpeg, official layout)."""
    images = sorted((shared_data / 'LIVE1' / 'gray').glob('*.png'))
    for folder, paths in (('train', images[:8]), ('val_src', images[8:11])):
        (tmp_path / folder).mkdir()
        for name, img in _crops(paths, 96, cv2.IMREAD_GRAYSCALE).items():
            cv2.imwrite(str(tmp_path / folder / f'{name}.png'), img)
    assert make_jpeg.main([str(tmp_path / 'val_src'), str(tmp_path / 'LIVE1'), '-q', '10', '-j', '1']) == 0
    shutil.rmtree(tmp_path / 'val_src')
    opt = _options(
        'car_live1', 1, {'upscale': 1, 'in_chans': 1},
        train={'type': 'JPEGArtifactDataset', 'dataroot_gt': str(tmp_path / 'train'), 'quality': [10, 40],
               'gt_size': 24},
        val={'name': 'LIVE1', 'type': 'JPEGArtifactDataset', 'dataroot_gt': str(tmp_path / 'LIVE1' / 'HQ'),
             'dataroot_lq': str(tmp_path / 'LIVE1' / 'LQ' / '10')},
        crop_border=0, y=True, loss='CharbonnierLoss')
    vals, run_dir = _train(tmp_path, opt)
    pairs = []
    for path in sorted((tmp_path / 'LIVE1' / 'HQ').glob('*.png')):
        gt = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)  # 2-D, as tensor2img returns 1-channel images
        lq = cv2.imread(str(tmp_path / 'LIVE1' / 'LQ' / '10' / f'{path.stem}.jpg'), cv2.IMREAD_GRAYSCALE)
        pairs.append((lq[..., None].astype(np.float32) / 255, gt))
    _check(vals, _recompute(opt, run_dir, pairs), (5, 45))


# ------------------------------------------------------------------------------------------------ MambaIRv2
# The shipped light-SR x2 option file with a tiny MambaIRv2Light (window 8, one group of two layers) and tiny data.
TINY_V2 = dict(embed_dim=24, depths=[2], num_heads=[2], window_size=8, inner_rank=8, num_tokens=8, d_state=4,
               mlp_ratio=1.0)


def _v2_option_file(tmp_path: Path, shared_data: Path, total_iter: int) -> dict:
    """options/train/train_MambaIRv2_lightSR_x2.yml on T91 (LR by mambair-make-lr) -> Set5 crops (official LR)."""
    opt = load_options('train/train_MambaIRv2_lightSR_x2.yml')
    assert (opt['model_type'], opt['network_g']['type']) == ('MambaIRv2LightModel', 'MambaIRv2Light')
    assert opt['network_g']['routing'] is None  # Gumbel in training, deterministic in validation
    if not (tmp_path / 'val_hr').is_dir():
        t91 = tmp_path / 'T91'
        t91.mkdir()
        for path in sorted((shared_data / 'T91').glob('*.bmp'))[:8]:
            shutil.copy(path, t91 / path.name)
        assert make_lr.main([str(t91), str(tmp_path / 'lr'), '-s', '2', '--hr-out', str(tmp_path / 'hr')]) == 0
        for folder in ('val_hr', 'val_lr'):
            (tmp_path / folder).mkdir()
        for name in ('baby', 'bird', 'head'):  # 64 x 64 HR crops at even offsets: the official LR crops fit
            hr = cv2.imread(str(shared_data / 'Set5' / 'HR' / f'{name}.png'))
            lr = cv2.imread(str(shared_data / 'Set5' / 'LR_bicubic' / 'X2' / f'{name}x2.png'))
            cv2.imwrite(str(tmp_path / 'val_hr' / f'{name}.png'), hr[96:160, 96:160])
            cv2.imwrite(str(tmp_path / 'val_lr' / f'{name}.png'), lr[48:80, 48:80])
    train, val = opt['datasets']['train'], opt['datasets']['val']
    train.update(dataroot_gt=str(tmp_path / 'hr'), dataroot_lq=str(tmp_path / 'lr' / 'X2'), gt_size=32,
                 batch_size_per_gpu=4, num_worker_per_gpu=0, dataset_enlarge_ratio=10)
    val.update(name='Set5', dataroot_gt=str(tmp_path / 'val_hr'), dataroot_lq=str(tmp_path / 'val_lr'),
               filename_tmpl='{}')
    opt['network_g'].update(TINY_V2)
    opt['name'] = 'v2_light'
    opt['train']['total_iter'] = total_iter
    opt['train']['optim_g']['lr'] = 2e-3  # a few dozen steps must show progress
    opt['val'].update(val_freq=10, save_img=False)
    opt['logger'].update(print_freq=5, save_checkpoint_freq=10, use_tb_logger=False)
    return opt


def test_mambairv2_light_sr_from_its_option_file_improves_and_resumes(tmp_path, shared_data):
    """A tiny MambaIRv2Light trained through mambair-train from the shipped option file: validation PSNR on real
    Set5 crops rises; a longer run with --auto_resume continues from the last state (iteration 20)."""
    opt = _v2_option_file(tmp_path, shared_data, total_iter=20)
    yml = write_options(tmp_path / 'v2.yml', opt)
    run_cli('mambair-train', '-opt', str(yml), cwd=tmp_path, timeout=300)
    run_dir = tmp_path / 'experiments' / 'v2_light'
    assert sorted(p.name for p in (run_dir / 'training_states').iterdir()) == ['10.state', '20.state']

    write_options(yml, _v2_option_file(tmp_path, shared_data, total_iter=40))
    run_cli('mambair-train', '-opt', str(yml), '--auto_resume', cwd=tmp_path, timeout=300)
    logs = sorted(run_dir.glob('train_v2_light_*.log'))
    assert len(logs) == 2
    resumed = logs[1].read_text()
    assert re.findall(r'Resuming training from epoch: \d+, iter: (\d+)', resumed) == ['20'], resumed[-3000:]
    assert 'End of training' in resumed and (run_dir / 'models' / 'net_g_40.pth').is_file()
    # each run validates every 10 iterations and once more with the final weights: 10, 20, 20 | 30, 40, 40
    psnr = [[float(v) for v in re.findall(r'Validation Set5\n\t # psnr: ([-\d.]+)', log.read_text())] for log in logs]
    assert [len(p) for p in psnr] == [3, 3] and psnr[0][1] == psnr[0][2] and psnr[1][1] == psnr[1][2], psnr
    assert psnr[1][-1] > psnr[0][0] + 1, psnr  # iteration 40 against iteration 10
