"""Option files in the official MambaIR dialect (spec 4, Tables A-C) run as they are.

The files below are written here with the keys and layout of the official ones (``task:`` / ``noise`` datasets,
lists of data roots, Restormer's realDenoising keys, ``num_gpu: 8``); only paths, sizes and iteration counts are
ours. Checked on real images: the noise of the official denoising datasets (sigma, seeded validation noise),
grayscale ``.jpg`` CAR pairs, concatenated data roots, the realDN progressive stages, the official 200-pixel test
chop, a HAT-style plugin script (resume and torchrun on the CPU), and one-line errors before any folder exists.
"""

from __future__ import annotations

import string
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cli_env, free_port, run_cli

from basicsr_mambair.data.util import encode_jpeg
from basicsr_mambair.errors import OptionError
from basicsr_mambair.utils.matlab_resize import imresize_matlab

TINY_MAMBAIR = 'embed_dim: 30\n  depths: [1]\n  d_state: 4\n  mlp_ratio: 1.0'
SIGMA15_PSNR = 20 * np.log10(255 / 15)  # 24.61 dB: PSNR of sigma-15 noise, unclipped


def write(path: Path, template: str, **values) -> Path:
    path.write_text(string.Template(template).substitute(values))
    return path


def parse(monkeypatch, root: Path, yml: Path, *extra: str, is_train: bool = True) -> dict:
    """The options BasicSR's pipeline gets (our parse_options, installed at import)."""
    from basicsr.utils.options import parse_options

    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(yml), *extra])
    opt, _ = parse_options(str(root), is_train=is_train)
    return opt


def stderr_lines(proc: subprocess.CompletedProcess, marker: str) -> list[str]:
    return [line for line in proc.stderr.splitlines() if marker in line]


def copy_images(paths, folder: Path, flag: int = cv2.IMREAD_COLOR, size: int | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        img = cv2.imread(str(path), flag)
        if size:
            img = img[:size, :size]
        target = folder / (path.stem + ('.png' if path.suffix == '.tif' else path.suffix))
        assert cv2.imwrite(str(target), img)
        out.append(target)
    return out


# ------------------------------------------------------------------ Gaussian colour denoising
COLOR_DN_TRAIN = """name: MambaIR_ColorDN_level15
model_type: MambaIRModel
scale: 1
num_gpu: 8
manual_seed: 10

datasets:
  train:
    task: denoising_color
    noise: 15 # 15/25/50
    name: DFWB_RGB
    type: PairedImageDataset
    dataroot_gt: $train
    dataroot_lq: $train
    filename_tmpl: '{}'
    io_backend:
      type: disk

    gt_size: 128
    use_hflip: true
    use_rot: true

    use_shuffle: true
    num_worker_per_gpu: 0
    batch_size_per_gpu: 2
    dataset_enlarge_ratio: 1
    prefetch_mode: ~

  val:
    task: denoising_color
    noise: 15 # 15/25/50
    name: CBSD68
    type: PairedImageDataset
    dataroot_gt: $val
    dataroot_lq: $val
    filename_tmpl: '{}'
    io_backend:
      type: disk

network_g:
  type: MambaIR
  upscale: 1
  in_chans: 3
  img_size: 128
  img_range: 1.
  $tiny

path:
  pretrain_network_g: ~
  strict_load_g: true
  resume_state: ~

train:
  optim_g:
    type: Adam
    lr: !!float 2e-4
    weight_decay: 0
    betas: [0.9, 0.99]
  scheduler:
    type: MultiStepLR
    milestones: [ 800000, 1200000, 1400000, 1500000 ]
    gamma: 0.5
  total_iter: 1600000
  warmup_iter: -1
  pixel_opt:
    type: CharbonnierLoss
    loss_weight: 1.0
    reduction: mean
    eps: !!float 1e-3

val:
  val_freq: !!float 5e3
  save_img: false
  metrics:
    psnr:
      type: calculate_psnr
      crop_border: 0
      test_y_channel: false

logger:
  print_freq: 200
  save_checkpoint_freq: !!float 5e3
  use_tb_logger: true
  wandb:
    project: ~
    resume_id: ~

dist_params:
  backend: nccl
  port: 29500
"""

# a test file of the official layout whose network is the identity (MATLAB bicubic at scale 1)
IDENTITY_TEST = """name: $name
model_type: MambaIRModel
scale: 1
num_gpu: 8
manual_seed: 0

datasets:
  test_1:
    task: $task
$noise    name: $dataset
    type: PairedImageDataset
    dataroot_gt: $gt
    dataroot_lq: $lq
    filename_tmpl: '{}'
    io_backend:
      type: disk

network_g:
  type: Bicubic
  upscale: 1

path:
  pretrain_network_g: ~
  strict_load_g: true

val:
  save_img: false
  suffix: ~
  selfensemble_testing: false
  patchwise_testing: false

  metrics:
    psnr:
      type: calculate_psnr
      crop_border: 0
      test_y_channel: $y
    ssim:
      type: calculate_ssim
      crop_border: 0
      test_y_channel: $y
"""


def unclipped_psnr(lq: torch.Tensor, gt: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((lq.double() - gt.double()) ** 2).mean()))


def official_val_noise(path: Path, sigma: float) -> np.ndarray:
    """The official PairedImageDataset, task denoising_color, phase val: float32 BGR image plus seeded noise."""
    img_gt = cv2.imread(str(path)).astype(np.float32) / 255.
    np.random.seed(seed=0)
    return img_gt + np.random.normal(0, sigma / 255., img_gt.shape)


def test_color_denoising_adds_the_official_noise(tmp_path, shared_data, monkeypatch, capsys):
    images = sorted((shared_data / 'CBSD68').glob('*.png'))
    train = copy_images(images[:3], tmp_path / 'DFWB_RGB' / 'HQ')
    val = copy_images(images[3:6], tmp_path / 'CBSD68HQ')
    yml = write(tmp_path / 'train_dn.yml', COLOR_DN_TRAIN, train=train[0].parent, val=val[0].parent,
                tiny=TINY_MAMBAIR)
    opt = parse(monkeypatch, tmp_path, yml)
    err = capsys.readouterr().err
    assert err.count('official option dialect') == 1 and 'task: denoising_color -> GaussianNoiseDataset' in err
    assert err.count('num_gpu: 8') == 1 and opt['num_gpu'] == torch.cuda.device_count()

    from basicsr.data import build_dataset

    # training: fresh sigma-15 noise on every read (an identity network would score 24.61 dB unclipped)
    train_set = build_dataset(opt['datasets']['train'])
    items = [train_set[i % 3] for i in range(6)]
    assert all(item['lq'].shape == (3, 128, 128) for item in items)
    psnr = unclipped_psnr(torch.stack([i['lq'] for i in items]), torch.stack([i['gt'] for i in items]))
    assert psnr == pytest.approx(SIGMA15_PSNR, abs=0.05)
    assert not torch.equal(items[0]['lq'] - items[0]['gt'], items[3]['lq'] - items[3]['gt'])

    # validation: exactly the official seeded noise, whole image, unclipped
    val_set = build_dataset(opt['datasets']['val'])
    for k, path in enumerate(val):
        item = val_set[k]
        expected = official_val_noise(path, 15)
        assert torch.equal(item['lq'], torch.from_numpy(expected[..., ::-1].astype(np.float32).transpose(2, 0, 1)))
        assert unclipped_psnr(item['lq'], item['gt']) == pytest.approx(SIGMA15_PSNR, abs=0.03)
        assert item['lq'].min() < 0 and item['lq'].max() > 1  # not clipped

    # through mambair-test with the identity network: the official pipeline's PSNR (8-bit output), 1 warning
    from basicsr.metrics import calculate_psnr

    test_yml = write(tmp_path / 'test_dn.yml', IDENTITY_TEST, name='dn_identity', task='denoising_color',
                     noise='    noise: 15\n', dataset='CBSD68', gt=val[0].parent, lq=val[0].parent, y='false')
    proc = run_cli('mambair-test', '-opt', str(test_yml), cwd=tmp_path)
    assert len(stderr_lines(proc, 'num_gpu: 8')) == 1 and len(stderr_lines(proc, 'official option dialect')) == 1
    def as_8bit(img: np.ndarray) -> np.ndarray:  # BasicSR's tensor2img: float32, clamp, x255, round
        return (np.clip(img.astype(np.float32), 0, 1) * 255.0).round().astype(np.uint8)

    expected = np.mean([calculate_psnr(as_8bit(official_val_noise(p, 15)), cv2.imread(str(p)), crop_border=0)
                        for p in val])
    row = (tmp_path / 'results' / 'dn_identity' / 'results.csv').read_text().splitlines()[1].split(',')
    assert float(row[2]) == pytest.approx(expected, abs=1e-9) and 24.6 < expected < 25


# ------------------------------------------------------------------ JPEG CAR
def test_car_pairs_are_grayscale_jpg(tmp_path, shared_data):
    from basicsr.metrics import calculate_psnr, calculate_ssim

    gt_paths = copy_images(sorted((shared_data / 'Classic5').glob('*.bmp')), tmp_path / 'Classic5_HQ',
                           cv2.IMREAD_GRAYSCALE)
    lq_dir = tmp_path / 'Classic5_LQ' / '10'
    lq_dir.mkdir(parents=True)
    for path in gt_paths:  # the official layout: <name>.jpg beside GT <name>.bmp
        (lq_dir / f'{path.stem}.jpg').write_bytes(encode_jpeg(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), 10))
    yml = write(tmp_path / 'test_car.yml', IDENTITY_TEST, name='car_identity', task='CAR', noise='',
                dataset='Classic5', gt=gt_paths[0].parent, lq=lq_dir, y='true')
    run_cli('mambair-test', '-opt', str(yml), cwd=tmp_path)
    psnr, ssim = [], []
    for path in gt_paths:  # the identity network scores the JPEG files themselves
        gt, lq = (cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in (path, lq_dir / f'{path.stem}.jpg'))
        psnr.append(calculate_psnr(lq, gt, crop_border=0, test_y_channel=True))
        ssim.append(calculate_ssim(lq, gt, crop_border=0, test_y_channel=True))
    row = (tmp_path / 'results' / 'car_identity' / 'results.csv').read_text().splitlines()[1].split(',')
    assert (row[0], int(row[1])) == ('Classic5', 5)
    assert float(row[2]) == pytest.approx(np.mean(psnr), abs=1e-9) and 25 < np.mean(psnr) < 32
    assert float(row[3]) == pytest.approx(np.mean(ssim), abs=1e-9)

    # an LQ folder without the matching .jpg: one line naming the key and the fix, nothing created
    (lq_dir / 'boats.jpg').rename(lq_dir / 'boats.png')
    proc = run_cli('mambair-test', '-opt', str(yml), '--force_yml', 'name=car_missing', cwd=tmp_path, check=False)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith('basicsr-mambair: ')]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith('mambair-test: error: datasets:test_1:dataroot_lq: 1 of 5 LQ images missing')
    assert 'boats.jpg for boats.bmp (LQ files are named <GT name>.jpg; make them with mambair-make-jpeg)' in lines[0]
    assert not (tmp_path / 'results' / 'car_missing').exists()


# ------------------------------------------------------------------ the official test: 200-pixel chop
SR_TEST = """name: test_MambaIR_SR_x2
model_type: MambaIRModel
scale: 2
num_gpu: 8
manual_seed: 10

datasets:
  test_1:  # the 1st test dataset
    name: Kodak
    type: PairedImageDataset
    dataroot_gt: $hr
    dataroot_lq: $lr
    filename_tmpl: '{}x2'
    io_backend:
      type: disk

network_g:
  type: MambaIR
  upscale: 2
  in_chans: 3
  img_size: 64
  img_range: 1.
  $tiny
  upsampler: 'pixelshuffledirect'
  resi_connection: '1conv'

path:
  pretrain_network_g: $weights
  strict_load_g: true

val:
  save_img: true
  suffix: ~  # add suffix to saved images, if None, use exp name

  metrics:
    psnr:
      type: calculate_psnr
      crop_border: 2
      test_y_channel: true
"""


def spec_chop(net, lq: torch.Tensor, scale: int) -> torch.Tensor:
    """spec 4.2, written out: tiles per axis side // 200 + 1, reflect pad to a multiple, 10 % shave, hard seams."""
    _, c, h, w = lq.shape
    n = [h // 200 + 1, w // 200 + 1]
    pads = [(k - side % k) % k for k, side in zip(n, (h, w))]
    img = F.pad(lq, (0, pads[1], 0, pads[0]), mode='reflect')
    step = [img.shape[2] // n[0], img.shape[3] // n[1]]
    shave = [s // 10 for s in step]
    canvas = torch.zeros(1, c, img.shape[2] * scale, img.shape[3] * scale)
    for i in range(n[0]):
        rows = (i * step[0] - (shave[0] if i else 0), (i + 1) * step[0] + (shave[0] if i < n[0] - 1 else 0))
        for j in range(n[1]):
            cols = (j * step[1] - (shave[1] if j else 0), (j + 1) * step[1] + (shave[1] if j < n[1] - 1 else 0))
            with torch.no_grad():
                tile = net(img[:, :, rows[0]:rows[1], cols[0]:cols[1]])
            top, left = (shave[0] * scale if i else 0), (shave[1] * scale if j else 0)
            canvas[:, :, i * step[0] * scale:(i + 1) * step[0] * scale, j * step[1] * scale:(j + 1) * step[1] * scale] \
                = tile[:, :, top:top + step[0] * scale, left:left + step[1] * scale]
    return canvas[:, :, :h * scale, :w * scale]


def test_official_test_file_runs_the_official_chop(tmp_path, shared_data):
    from basicsr.archs import build_network
    from basicsr.utils import img2tensor, tensor2img

    hr = cv2.imread(str(shared_data / 'Kodak24' / 'full_768x512' / 'kodim05.png'))[:502, :766]  # LR 251 x 383
    lr = imresize_matlab(hr, 2)
    (tmp_path / 'HR').mkdir()
    (tmp_path / 'LR').mkdir()
    cv2.imwrite(str(tmp_path / 'HR' / 'kodim05.png'), hr)
    cv2.imwrite(str(tmp_path / 'LR' / 'kodim05x2.png'), lr)
    torch.manual_seed(0)
    net = build_network(dict(type='MambaIR', upscale=2, in_chans=3, embed_dim=30, depths=[1], d_state=4,
                             mlp_ratio=1.0, upsampler='pixelshuffledirect')).eval()
    torch.save({'params': net.state_dict()}, tmp_path / 'net.pth')
    yml = write(tmp_path / 'test_sr.yml', SR_TEST, hr=tmp_path / 'HR', lr=tmp_path / 'LR', tiny=TINY_MAMBAIR,
                weights=tmp_path / 'net.pth')
    x = img2tensor(lr.astype(np.float32) / 255, bgr2rgb=True, float32=True)[None]
    chopped = tensor2img([spec_chop(net, x, 2)[0]])
    with torch.no_grad():
        whole = tensor2img([net(x)[0]])
    assert (chopped != whole).any(axis=2).mean() > 0.01  # the two pipelines really differ on this image

    saved = tmp_path / 'results' / 'test_MambaIR_SR_x2' / 'visualization' / 'Kodak' / 'kodim05x2_test_MambaIR_SR_x2.png'
    run_cli('mambair-test', '-opt', str(yml), cwd=tmp_path)
    np.testing.assert_array_equal(cv2.imread(str(saved)), chopped)
    # tile: 0 (a key the file lacks, set from the command line) is the whole image in one forward
    run_cli('mambair-test', '-opt', str(yml), '--force_yml', 'val:tile=0', cwd=tmp_path)
    np.testing.assert_array_equal(cv2.imread(str(saved)), whole)


# ------------------------------------------------------------------ lists of roots, plugin script, resume, DDP
LIGHT_SR_TRAIN = """# general settings for image SR training
name: MambaIR_lightSR_x2
model_type: MambaIRModel
scale: 2
num_gpu: 8
manual_seed: 10

datasets:
  train:
    task: SR
    name: DF2K
    type: PairedImageDataset
    dataroot_gt:
      - $hr_a
      - $hr_b
    dataroot_lq:
      - $lr_a
      - $lr_b
    filename_tmpl: '{}'
    io_backend:
      type: disk

    gt_size: 32
    use_hflip: true
    use_rot: true

    use_shuffle: true
    num_worker_per_gpu: 0
    batch_size_per_gpu: 2
    dataset_enlarge_ratio: 1
    prefetch_mode: ~

  val:
    name: Urban100
    type: PairedImageDataset
    dataroot_gt: $hr_a
    dataroot_lq: $lr_a
    filename_tmpl: '{}'
    io_backend:
      type: disk

network_g:
  type: MambaIR
  upscale: 2
  in_chans: 3
  img_size: 64
  img_range: 1.
  $tiny
  upsampler: 'pixelshuffledirect'
  resi_connection: '1conv'

path:
  pretrain_network_g: ~
  strict_load_g: true
  resume_state: ~

train:
  optim_g:
    type: Adam
    lr: !!float 2e-4
    weight_decay: 0
    betas: [0.9, 0.99]
  scheduler:
    type: MultiStepLR
    milestones: [250000, 400000, 450000, 475000]
    gamma: 0.5
  total_iter: 4
  warmup_iter: -1
  pixel_opt:
    type: L1Loss
    loss_weight: 1.0
    reduction: mean

val:
  val_freq: 4
  save_img: false
  metrics:
    psnr:
      type: calculate_psnr
      crop_border: 2
      test_y_channel: true

logger:
  print_freq: 1
  save_checkpoint_freq: 2
  use_tb_logger: false
  wandb:
    project: ~
    resume_id: ~

dist_params:
  backend: nccl
  port: 29500
"""

# HAT's / Real-ESRGAN's train.py: import the plugin, then BasicSR's own pipeline
PLUGIN_SCRIPT = """import os

import basicsr_mambair  # noqa: F401
from basicsr.train import train_pipeline

if __name__ == '__main__':
    train_pipeline(os.getcwd())
"""


def test_plugin_script_with_lists_of_roots_resumes_and_runs_ddp_on_cpu(tmp_path, monkeypatch):
    from tiny_experiments import make_sr_pairs

    hr_a, lr_a = make_sr_pairs(tmp_path / 'DIV2K', size=64, per_photo=1)
    hr_b, lr_b = make_sr_pairs(tmp_path / 'Flickr2K', size=48, per_photo=2)
    yml = write(tmp_path / 'train_lightSR.yml', LIGHT_SR_TRAIN, hr_a=hr_a, lr_a=lr_a, hr_b=hr_b, lr_b=lr_b,
                tiny=TINY_MAMBAIR)

    from basicsr.data import build_dataset

    train_set = build_dataset(parse(monkeypatch, tmp_path, yml)['datasets']['train'])
    assert len(train_set) == 4 + 8  # DIV2K + Flickr2K
    assert {Path(train_set[i]['gt_path']).parent for i in (0, 11)} == {hr_a, hr_b}

    script = tmp_path / 'train.py'
    script.write_text(PLUGIN_SCRIPT)
    env = cli_env(CUDA_VISIBLE_DEVICES='')  # the CPU, also where a GPU is present

    def run(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([*(launcher or [sys.executable]), str(script), '-opt', str(yml), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    exp = tmp_path / 'experiments' / 'MambaIR_lightSR_x2'
    proc = run()
    assert len(stderr_lines(proc, 'num_gpu: 8')) == 1 and '2 data roots concatenated' in proc.stderr
    assert (exp / 'models' / 'net_g_4.pth').is_file() and 'Number of train images: 12' in proc.stderr
    # --auto_resume on the CPU (stock BasicSR maps the state onto CUDA), with a longer schedule
    run('--auto_resume', '--force_yml', 'train:total_iter=6')
    log = sorted(exp.glob('train_*.log'))[-1].read_text()
    assert 'Resuming training from epoch' in log and 'iter: 4.' in log and 'End of training' in log
    assert (exp / 'models' / 'net_g_6.pth').is_file()
    # torchrun on the CPU: gloo although the file says nccl
    run('--launcher', 'pytorch', '--force_yml', 'name=ddp', launcher=[
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}'])
    log = next((tmp_path / 'experiments' / 'ddp').glob('train_*.log')).read_text()
    assert 'World size (gpu number): 2' in log and 'End of training' in log


# ------------------------------------------------------------------ realDenoising (Restormer's dialect)
REAL_DN_TRAIN = """# general settings for RealDN training
name: MambaIR_RealDN
model_type: ImageCleanModel
scale: 1
num_gpu: 8  # set num_gpu: 0 for cpu mode
manual_seed: 100

datasets:
  train:
    name: TrainSet
    type: Dataset_PairedImage
    dataroot_gt: $clean
    dataroot_lq: $noisy
    geometric_augs: true

    filename_tmpl: '{}'
    io_backend:
      type: disk

    use_shuffle: true
    num_worker_per_gpu: 0
    batch_size_per_gpu: 2

    mini_batch_sizes: [4,2,1]
    iters: [3,3,4]
    gt_size: 64
    gt_sizes: [32,48,64]

    dataset_enlarge_ratio: 20
    prefetch_mode: ~

  val:
    name: ValSet
    type: Dataset_PairedImage
    dataroot_gt:  $clean
    dataroot_lq:  $noisy
    io_backend:
      type: disk

network_g:
  type: MambaIRUNet
  inp_channels: 3
  out_channels: 3
  dim: 32
  num_blocks: [1, 1, 1, 1]
  num_refinement_blocks: 1
  mlp_ratio: 1.5
  bias: False
  dual_pixel_task: False

path:
  pretrain_network_g: ~
  strict_load_g: true
  resume_state: ~

train:
  total_iter: 10
  warmup_iter: -1 # no warm up
  use_grad_clip: true
  scheduler:
    type: CosineAnnealingRestartCyclicLR
    periods: [4, 6]
    restart_weights: [1,1]
    eta_mins: [0.0003,0.000001]
  mixing_augs:
    mixup: true
    mixup_beta: 1.2
    use_identity: true
  optim_g:
    type: AdamW
    lr: !!float 3e-4
    weight_decay: !!float 1e-4
    betas: [0.9, 0.999]
  pixel_opt:
    type: L1Loss
    loss_weight: 1
    reduction: mean

val:
  window_size: 8
  val_freq: 10
  save_img: false
  rgb2bgr: true
  use_image: false
  max_minibatch: 8
  metrics:
    psnr:
      type: calculate_psnr
      crop_border: 0
      test_y_channel: false

logger:
  print_freq: 1
  save_checkpoint_freq: 10
  use_tb_logger: false
  wandb:
    project: ~
    resume_id: ~

dist_params:
  backend: nccl
  port: 29500
"""


def test_real_denoising_dialect_trains_through_its_stages(tmp_path, shared_data, monkeypatch):
    noisy, clean = tmp_path / 'input_crops', tmp_path / 'target_crops'
    for kind, folder in (('NOISY', noisy), ('GT', clean)):
        for i, (h, w) in {6: (128, 128), 11: (121, 97)}.items():  # real SIDD crops, one of odd size
            folder.mkdir(exist_ok=True)
            img = cv2.imread(str(shared_data / 'SIDD_samples' / kind / f'{kind}_{i}.png'))
            cv2.imwrite(str(folder / f'sidd_{i}.png'), img[:h, :w])
    yml = write(tmp_path / 'train_realdn.yml', REAL_DN_TRAIN, clean=clean, noisy=noisy)

    from basicsr.models import build_model

    from basicsr_mambair.models.lr_scheduler import CosineAnnealingRestartCyclicLR

    opt = parse(monkeypatch, tmp_path, yml)
    train_opt = opt['datasets']['train']
    assert (train_opt['use_hflip'], train_opt['use_rot'], train_opt['mini_batch_sizes']) == (True, True, [2, 2, 1])
    model = build_model(opt)
    assert type(model).__name__ == 'RealDenoisingModel' and model.tiling() == ('whole', 0)
    assert model.use_grad_clip and model.mixup and model.mixup_identity and model.mixup_beta == 1.2
    assert isinstance(model.schedulers[0], CosineAnnealingRestartCyclicLR)
    assert type(model.optimizer_g).__name__ == 'AdamW'

    proc = run_cli('mambair-train', '-opt', str(yml), cwd=tmp_path)
    line = stderr_lines(proc, 'official option dialect')[0]
    assert 'ImageCleanModel -> RealDenoisingModel' in line and 'mini_batch_sizes [4, 2, 1] -> [2, 2, 1]' in line
    log = next((tmp_path / 'experiments' / 'MambaIR_RealDN').glob('train_*.log')).read_text()
    stages = [line.split('Progressive training: ')[1] for line in log.splitlines() if 'Progressive training' in line]
    assert stages == ['patch size 32, batch size 2 per process from iteration 1',
                      'patch size 48, batch size 2 per process from iteration 4',
                      'patch size 64, batch size 1 per process from iteration 7']
    assert 'Validation ValSet' in log and '# psnr:' in log


# ------------------------------------------------------------------ what cannot mean anything: one line
def test_dialect_errors_name_the_key_and_the_fix(tmp_path):
    from tiny_experiments import make_sr_pairs

    from basicsr_mambair.options import load_options

    hr, lr = make_sr_pairs(tmp_path / 'data', size=48, per_photo=1)
    text = string.Template(LIGHT_SR_TRAIN).substitute(hr_a=hr, lr_a=lr, hr_b=hr, lr_b=lr, tiny=TINY_MAMBAIR)
    one_lq_root = (f'dataroot_lq:\n      - {lr}\n      - {lr}', f'dataroot_lq: {lr}')
    cases = [  # (edit of the file, what the one line must say)
        (one_lq_root, 'datasets:train: dataroot_gt is a list of 2, dataroot_lq is one folder; give dataroot_gt and '
                      'dataroot_lq as lists of the same length'),
        (('task: SR', 'task: deblur'), "datasets:train:task: unknown task 'deblur' (the official tasks: SR, "
                                       'denoising_color, denoising_gray, CAR)'),
        (('task: SR', 'task: denoising_color'), 'datasets:train: task: denoising_color needs noise: <sigma on the '
                                                '0-255 scale>'),
        (('type: disk', 'type: lmdb'), 'datasets:train:dataroot_gt: lists of data roots work with folders'),
    ]
    bad = tmp_path / 'bad.yml'
    for (old, new), message in cases:
        assert old in text
        bad.write_text(text.replace(old, new, 1))
        with pytest.raises(OptionError) as info:
            load_options(str(bad))
        assert str(info.value).startswith(message), info.value
    # through the command: exit status 2, that one line, no experiment folder
    bad.write_text(text.replace(*one_lq_root, 1))
    proc = run_cli('mambair-train', '-opt', str(bad), cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f'mambair-train: error: {cases[0][1]}')
    assert not (tmp_path / 'experiments').exists()
