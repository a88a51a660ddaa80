"""Real-world SR: the two-stage Real-ESRGAN recipe with BasicSR's models and degradations, on real images.

A tiny MambaIR with the ``nearest+conv`` head goes through the shipped option files (shrunk: tiny network,
small crops, a few iterations): stage 1 (``MambaIRRealESRNetModel``, L1) validates on real photos without
ground truth (NIQE, tiles), saves and resumes with ``--auto_resume``; stage 2 (``MambaIRRealESRGANModel``,
L1 + perceptual + GAN with the U-Net discriminator, EMA) starts from stage 1's EMA weights through the option
file's relative ``pretrain_network_g``, and resumes too. The stage-2 generator then restores real photos through
``mambair-test`` (no ground truth, NIQE) and ``mambair-restore`` (config inferred from the weights), both equal
to the network. The perceptual loss is a tiny registered stand-in (BasicSR's needs VGG weights that cannot be
downloaded here); the missing-VGG case itself must end with one line before anything is written.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import REPO, cli_env, run_cli
from tiny_experiments import load_options, write_options

from basicsr_mambair.cli import make_meta_info
from basicsr_mambair.cli.train import main_test, main_train

# the smallest MambaIR with the real-SR head (30 channels: the channel attention squeezes by 30)
TINY_G = dict(type='MambaIR', upscale=4, in_chans=3, embed_dim=30, depths=[1], d_state=4, mlp_ratio=1.0,
              upsampler='nearest+conv', resi_connection='1conv')
STAGE1 = 'train_MambaIR_RealESRNet_x4'
STAGE2 = 'train_MambaIR_RealESRGAN_x4'
LQ_PHOTOS = {'butterfly': 64, 'bird': 72}  # Set5's x4 LR images (side): real LQ inputs without ground truth
TRAIN_CODE = ('import sys, basicsr_mambair, tiny_experiments; tiny_experiments.register_tiny_losses(); '
              'from basicsr_mambair.cli.train import main_train; sys.exit(main_train(sys.argv[1:]))')


def shrink(opt: dict, hr: Path, meta: Path) -> dict:
    """A shipped real-SR training option dict made tiny: network, crops, batch, pool, iterations, data.

    Crops of 64 (the smallest the USM sharpener's 51-pixel kernel can pad by reflection): one image per batch,
    because BasicSR's USM of the 400x400 training images (its fixed crop) takes seconds on a CPU.
    """
    opt['network_g'] = dict(TINY_G)
    opt['gt_size'], opt['queue_size'] = 64, 2
    opt['datasets']['train'].update(dataroot_gt=str(hr), meta_info=str(meta), gt_size=64, batch_size_per_gpu=1,
                                    num_worker_per_gpu=0)
    opt['train'].update(total_iter=2)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False)
    return opt


def train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``mambair-train`` with the tiny perceptual loss registered (the CLI's own code, in a subprocess)."""
    env = cli_env(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'tests')]))
    proc = subprocess.run([sys.executable, '-c', TRAIN_CODE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f'{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def newest_log(run_dir: Path) -> str:
    return sorted(run_dir.glob('train_*.log'))[-1].read_text()


def params(path: Path, key: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location='cpu', weights_only=True)[key]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, shared_data: Path) -> Path:
    """Both stages, each run to iteration 2 and resumed to 4, in one working directory (relative paths)."""
    work = tmp_path_factory.mktemp('realsr')
    hr = shared_data / 'T91'
    assert make_meta_info.main([str(hr), '-o', str(work / 'meta_info.txt'), '-j', '1']) == 0
    lq = work / 'RealSRSet'
    lq.mkdir()
    for name in LQ_PHOTOS:
        shutil.copy(shared_data / 'Set5' / 'LR_bicubic' / 'X4' / f'{name}x4.png', lq / f'{name}.png')

    opt1 = shrink(load_options(f'train/{STAGE1}.yml'), hr, work / 'meta_info.txt')
    opt1['gt_usm'] = False  # the sharpener is Real-ESRGAN's choice, and slow on a CPU; stage 2 runs it anyway
    # validation on real photos without ground truth (at the end of each run): saved outputs and NIQE
    opt1['datasets']['val'] = dict(name='RealSRSet', type='SingleImageDataset', dataroot_lq=str(lq),
                                   io_backend={'type': 'disk'})
    opt1['val'] = dict(val_freq=1000, save_img=True,
                       metrics={'niqe': dict(type='calculate_niqe', crop_border=4, better='lower')})
    opt2 = shrink(load_options(f'train/{STAGE2}.yml'), hr, work / 'meta_info.txt')
    opt2['network_d']['num_feat'] = 8
    opt2['train']['perceptual_opt'] = {'type': 'TinyPerceptualLoss', 'perceptual_weight': 1.0}
    # the generator is not stepped in the first 2 iterations (the discriminator is): its saved weights at
    # iteration 2 must then be exactly the ones stage 2 started from
    opt2['train']['net_d_init_iters'] = 2
    for opt in (opt1, opt2):
        yml = write_options(work / f'{opt["name"]}.yml', opt)
        train(['-opt', str(yml)], work)
        train(['-opt', str(yml), '--auto_resume', '--force_yml', 'train:total_iter=4'], work)
    return work


def test_stage1_degrades_on_the_fly_validates_without_gt_and_resumes(runs: Path) -> None:
    run = runs / 'experiments' / STAGE1
    logs = sorted(run.glob('train_*.log'))
    assert len(logs) == 2
    first, resumed = logs[0].read_text(), logs[1].read_text()
    assert 'Model [MambaIRRealESRNetModel] is created.' in first and 'Dataset [RealESRGANDataset]' in first
    assert re.search(r'iter:\s+2, .*l_pix: ', first)
    assert 'Resuming training from epoch: ' in resumed and 'iter: 2.' in resumed
    assert re.search(r'iter:\s+4, .*l_pix: ', resumed)
    # validation on real photos without ground truth: NIQE only, outputs saved (x4)
    assert len(re.findall(r'Validation RealSRSet\n\t # niqe: \d+\.\d+', first + resumed)) == 2
    for name, side in LQ_PHOTOS.items():  # saved at the end of training (BasicSR names them by its last counter)
        saved = sorted((run / 'visualization' / name).glob(f'{name}_*.png'))
        assert len(saved) == 2 and cv2.imread(str(saved[-1])).shape == (4 * side, 4 * side, 3)
    models = {p.name for p in (run / 'models').iterdir()}
    assert {'net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth'} <= models
    assert {p.name for p in (run / 'training_states').iterdir()} >= {'2.state', '4.state'}
    latest = torch.load(run / 'models' / 'net_g_latest.pth', weights_only=True)
    assert set(latest) == {'params', 'params_ema'}  # EMA, as Real-ESRGAN's stage 1
    assert any(not torch.equal(v, params(run / 'models' / 'net_g_2.pth', 'params')[k])
               for k, v in latest['params'].items())  # trained on after the resume


def test_stage2_starts_from_stage1_and_trains_the_gan(runs: Path) -> None:
    run, stage1 = runs / 'experiments' / STAGE2, runs / 'experiments' / STAGE1
    logs = sorted(run.glob('train_*.log'))
    first, resumed = logs[0].read_text(), logs[-1].read_text()
    assert 'Model [MambaIRRealESRGANModel] is created.' in first
    assert (f'Loading MambaIR model from experiments/{STAGE1}/models/net_g_latest.pth, with param key: '
            '[params_ema].') in first
    assert 'Network [UNetDiscriminatorSN] is created.' in first
    start = params(stage1 / 'models' / 'net_g_latest.pth', 'params_ema')
    at_2 = params(run / 'models' / 'net_g_2.pth', 'params')
    assert all(torch.equal(at_2[k], v) for k, v in start.items())  # stage 1's EMA weights, untouched
    assert 'Resuming training from epoch: ' in resumed and 'iter: 2.' in resumed
    for term in ('l_g_pix', 'l_g_percep', 'l_g_gan', 'l_d_real', 'l_d_fake'):
        assert re.search(rf'iter:\s+4, .*{term}: [-\d.e+]+', resumed), term
    at_4 = params(run / 'models' / 'net_g_4.pth', 'params')
    assert any(not torch.equal(at_4[k], v) for k, v in start.items())  # the generator trained after iteration 2
    assert {'net_d_2.pth', 'net_d_4.pth', 'net_g_latest.pth', 'net_d_latest.pth'} <= {
        p.name for p in (run / 'models').iterdir()}
    state = torch.load(run / 'training_states' / '4.state', weights_only=True)
    assert state['iter'] == 4 and len(state['optimizers']) == 2  # generator and discriminator


def tiny_generator(weights: Path) -> torch.nn.Module:
    from basicsr.archs import build_network

    net = build_network(dict(TINY_G)).eval()
    net.load_state_dict(params(weights, 'params_ema'), strict=True)
    return net


def expected_png(net: torch.nn.Module, path: Path) -> np.ndarray:
    """The network on a whole 8-bit BGR image file, as an 8-bit BGR image (clamped, rounded)."""
    rgb = cv2.imread(str(path))[..., ::-1].astype(np.float32) / 255
    with torch.no_grad():
        out = net(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None])[0].clamp(0, 1)
    return np.round(out.numpy().transpose(1, 2, 0)[..., ::-1] * 255).astype(np.uint8)


def test_mambair_restore_infers_the_real_sr_generator(runs: Path) -> None:
    weights = runs / 'experiments' / STAGE2 / 'models' / 'net_g_latest.pth'
    proc = run_cli('mambair-restore', str(runs / 'RealSRSet'), '-o', 'restored', '--weights', str(weights),
                   '--param-key', 'params_ema', '--tile', '0', cwd=runs)
    assert proc.stderr == '' and 'MambaIR (custom config), x4, 3->3 channels' in proc.stdout, proc.stdout
    net = tiny_generator(weights)
    for name in LQ_PHOTOS:
        result = cv2.imread(str(runs / 'restored' / f'{name}_x4.png'))
        np.testing.assert_array_equal(result, expected_png(net, runs / 'RealSRSet' / f'{name}.png'), err_msg=name)


def test_mambair_test_saves_real_photos_with_niqe_only(runs: Path) -> None:
    from basicsr.metrics import calculate_niqe

    from basicsr_mambair.tiling import forward_tiled

    weights = runs / 'experiments' / STAGE2 / 'models' / 'net_g_latest.pth'
    opt = load_options('test/test_MambaIR_RealSR_x4.yml')
    opt['network_g'] = dict(TINY_G)
    opt['datasets']['test_1']['dataroot_lq'] = str(runs / 'RealSRSet')
    opt['path']['pretrain_network_g'] = str(weights)
    opt['val'].update(tile=64, tile_overlap=16)  # bird (72x72) in 4 tiles
    yml = write_options(runs / 'test_realsr.yml', opt)
    proc = run_cli('mambair-test', '-opt', str(yml), cwd=runs)
    assert 'Traceback' not in proc.stderr
    folder = runs / 'results' / opt['name']
    net = tiny_generator(weights)
    niqe = []
    for name in LQ_PHOTOS:
        saved = cv2.imread(str(folder / 'visualization' / 'RealSRSet' / f'{name}_{opt["name"]}.png'))
        lq = cv2.imread(str(runs / 'RealSRSet' / f'{name}.png'))[..., ::-1].astype(np.float32) / 255
        with torch.no_grad():  # the blended tiles of val:tile / tile_overlap, on the EMA weights
            out = forward_tiled(net, torch.from_numpy(lq.transpose(2, 0, 1).copy())[None], 4, 64, 16)
        expected = np.round(out[0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1] * 255).astype(np.uint8)
        np.testing.assert_array_equal(saved, expected, err_msg=name)
        niqe.append(calculate_niqe(saved, crop_border=4))
    table = (folder / 'results.md').read_text()
    assert table.splitlines()[0] == '| dataset | images | NIQE |'
    assert f'| RealSRSet | 2 | {np.mean(niqe):.4f} |' in table
    assert 'psnr' not in (folder / 'per_image.csv').read_text().lower()


def test_a_full_reference_metric_without_ground_truth_is_one_line(tmp_path: Path, monkeypatch, capfd) -> None:
    """``mambair-test`` (in this process: the check runs before anything is imported or written)."""
    opt = load_options('test/test_MambaIR_RealSR_x4.yml')
    opt['datasets']['test_1']['dataroot_lq'] = str(tmp_path)
    opt['path']['pretrain_network_g'] = None
    opt['val']['metrics']['psnr'] = {'type': 'calculate_psnr', 'crop_border': 4}
    yml = write_options(tmp_path / 'psnr.yml', opt)
    monkeypatch.chdir(tmp_path)
    assert main_test(['-opt', str(yml)]) == 2
    out, err = capfd.readouterr()
    assert out == '' and err.count('\n') == 1 and err.startswith('mambair-test: error: ')
    assert 'val:metrics:psnr (calculate_psnr) compares with ground truth' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['psnr.yml']


def test_missing_vgg_weights_is_one_line_before_anything_is_written(tmp_path: Path, shared_data: Path, monkeypatch,
                                                                    capfd) -> None:
    """The shipped stage-2 file with its real PerceptualLoss, data and stage-1 weights present, no VGG19 weights:
    one line naming where they go; no experiment folder, no download (the hub cache stays empty)."""
    (tmp_path / 'meta.txt').write_text('t1.bmp\n')
    (tmp_path / 'stage1.pth').write_bytes(b'')
    hub = tmp_path / 'torch_home'
    monkeypatch.setenv('TORCH_HOME', str(hub))
    monkeypatch.chdir(tmp_path)
    overrides = [f'datasets:train:dataroot_gt={shared_data / "T91"}', f'datasets:train:meta_info={tmp_path}/meta.txt',
                 f'path:pretrain_network_g={tmp_path}/stage1.pth']
    assert main_train(['-opt', str(REPO / 'options' / 'train' / f'{STAGE2}.yml'), '--force_yml', *overrides]) == 2
    out, err = capfd.readouterr()
    assert out == '' and err.count('\n') == 1 and err.startswith('mambair-train: error: '), err
    expected = (f'train:perceptual_opt (PerceptualLoss): the vgg19 ImageNet weights are not on this machine and are '
                f'not downloaded automatically: put vgg19-dcbb9e9d.pth '
                f'(https://download.pytorch.org/models/vgg19-dcbb9e9d.pth) at {hub}/hub/checkpoints/vgg19-dcbb9e9d.pth')
    assert expected in err and 'experiments/pretrained_models/vgg19-dcbb9e9d.pth' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['meta.txt', 'stage1.pth']  # nothing written, nothing fetched


def test_vgg_weights_are_found_where_basicsr_and_torchvision_look(tmp_path: Path, monkeypatch) -> None:
    from basicsr_mambair.options import missing_vgg_weights

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    assert 'vgg19-dcbb9e9d.pth' in missing_vgg_weights('vgg19')
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    (cache / 'vgg19-dcbb9e9d.pth').touch()
    assert missing_vgg_weights('vgg19') is None
    assert 'vgg16-397923af.pth' in missing_vgg_weights('vgg16')
    (cache / 'vgg19-dcbb9e9d.pth').unlink()
    local = tmp_path / 'experiments' / 'pretrained_models' / 'vgg19-dcbb9e9d.pth'  # BasicSR's VGG_PRETRAIN_PATH
    local.parent.mkdir(parents=True)
    local.touch()
    assert missing_vgg_weights('vgg19') is None
    assert 'would load the vgg19 weights' in missing_vgg_weights('vgg16')  # BasicSR prefers that file for any type
