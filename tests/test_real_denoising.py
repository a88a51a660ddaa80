"""Real denoising: MambaIRUNet on real SIDD crops through the shipped option files and RealDenoisingModel."""

from __future__ import annotations

import math

import cv2
import pytest
import torch
from helpers import run_cli
from tiny_experiments import load_options, write_options

from basicsr_mambair.archs.mambairunet_arch import MambaIRUNet
from basicsr_mambair.models.lr_scheduler import CosineAnnealingRestartCyclicLR

TINY_UNET = dict(dim=32, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, mlp_ratio=1.5)


# real SIDD crops (image index -> height, width): small enough for one core, one of odd size
CROPS = {6: (128, 128), 7: (96, 136), 11: (121, 97)}


@pytest.fixture
def sidd_pairs(tmp_path, shared_data):
    """Crops of SIDD_samples pairs as two folders with equal names."""
    noisy, clean = tmp_path / 'pairs' / 'noisy', tmp_path / 'pairs' / 'clean'
    noisy.mkdir(parents=True)
    clean.mkdir()
    for i, (h, w) in CROPS.items():
        for kind, folder in (('NOISY', noisy), ('GT', clean)):
            img = cv2.imread(str(shared_data / 'SIDD_samples' / kind / f'{kind}_{i}.png'))
            cv2.imwrite(str(folder / f'sidd_{i}.png'), img[:h, :w])
    return noisy, clean


def test_odd_sized_real_noisy_image_keeps_its_size(shared_data):
    img = cv2.imread(str(shared_data / 'SIDD_samples' / 'NOISY' / 'NOISY_11.png'))[:121, :97, ::-1] / 255.0
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float()
    net = MambaIRUNet(**TINY_UNET).eval()
    with torch.no_grad():
        out = net(x)
        padded = net(torch.nn.functional.pad(x, (0, 7, 0, 7), mode='reflect'))  # to 128 x 104
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out, padded[..., :121, :97], atol=1e-5)  # = reflect-pad to 8k, run, crop


def test_cyclic_cosine_schedule_of_the_official_recipe():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=3e-4)
    sched = CosineAnnealingRestartCyclicLR(opt, periods=[4, 8], restart_weights=[1, 1], eta_mins=[3e-4, 1e-6])
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([3e-4] * 5)  # first cycle: floor = base, constant
    second = [1e-6 + 0.5 * (3e-4 - 1e-6) * (1 + math.cos(math.pi * (i - 4) / 8)) for i in range(5, 12)]
    assert lrs[5:] == pytest.approx(second)


def test_tiny_training_goes_through_progressive_stages(tmp_path, sidd_pairs):
    noisy, clean = sidd_pairs
    opt = load_options('train/train_MambaIR_RealDN.yml')
    opt['name'] = 'tiny_realdn'
    train = opt['datasets']['train']
    train.update(dataroot_gt=str(clean), dataroot_lq=str(noisy), num_worker_per_gpu=0, batch_size_per_gpu=4,
                 gt_size=64, gt_sizes=[32, 48, 64], mini_batch_sizes=[4, 2, 1], iters=[3, 3, 4],
                 dataset_enlarge_ratio=20)
    opt['datasets']['val'].update(dataroot_gt=str(clean), dataroot_lq=str(noisy))
    opt['network_g'].update(TINY_UNET)
    opt['train'].update(total_iter=10)
    opt['train']['scheduler'].update(periods=[4, 6])
    opt['val'].update(val_freq=10)
    opt['val']['metrics']['ssim'] = dict(type='calculate_ssim', crop_border=0, test_y_channel=False)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=10, use_tb_logger=False)
    run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'train.yml', opt)), cwd=tmp_path)

    log = next((tmp_path / 'experiments' / 'tiny_realdn').glob('train_*.log')).read_text()
    stages = [line.split('Progressive training: ')[1] for line in log.splitlines() if 'Progressive training' in line]
    assert stages == ['patch size 32, batch size 4 per process from iteration 1',
                      'patch size 48, batch size 2 per process from iteration 4',
                      'patch size 64, batch size 1 per process from iteration 7']
    assert 'Validation SIDD_val' in log and '# psnr:' in log and '# ssim:' in log
    assert (tmp_path / 'experiments' / 'tiny_realdn' / 'models' / 'net_g_10.pth').is_file()


def test_folder_test_option_on_real_pairs_of_any_size(tmp_path, sidd_pairs):
    noisy, clean = sidd_pairs
    weights = tmp_path / 'tiny_unet.pth'
    torch.save({'params': MambaIRUNet(**TINY_UNET).state_dict()}, weights)
    opt = load_options('test/test_MambaIR_RealDN_folder.yml')
    opt['datasets']['test_1'].update(dataroot_gt=str(clean), dataroot_lq=str(noisy))
    opt['network_g'].update(TINY_UNET)
    opt['path']['pretrain_network_g'] = str(weights)
    opt['val'].update(save_img=True, tile=64)  # tiles smaller than the images: the tiled path runs
    run_cli('mambair-test', '-opt', str(write_options(tmp_path / 'test.yml', opt)), cwd=tmp_path)
    results = tmp_path / 'results' / 'test_MambaIR_RealDN_folder'
    saved = {p.name: cv2.imread(str(p)).shape for p in (results / 'visualization' / 'real_noisy_pairs').iterdir()}
    assert saved == {f'sidd_{i}_test_MambaIR_RealDN_folder.png': (h, w, 3) for i, (h, w) in CROPS.items()}
    assert '| real_noisy_pairs | 3 |' in (results / 'results.md').read_text()
