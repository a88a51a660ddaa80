"""``mambair-demo``: train a small lightweight-SR MambaIR on the CPU in minutes, with no download.

1. builds an x2 SR training set and a validation set from the photographs bundled with
   scikit-image (MATLAB-bicubic LR images, as the official DIV2K ones);
2. trains a small ``MambaIR`` (``pixelshuffledirect``, the lightweight-SR head) with
   ``mambair-train`` -- periodic validation, TensorBoard logs, checkpoints;
3. evaluates the trained network and MATLAB-bicubic upsampling on the validation images with
   ``mambair-test`` and prints both tables; exits non-zero if the network does not beat bicubic.

Everything is written under ``--workdir`` (default ``./demo``).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

SCALE = 2
# scikit-image's bundled photographs (no download): colour photos for training, plus grey textures
TRAIN_PHOTOS = ('astronaut', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina', 'motorcycle',
                'brick', 'grass', 'gravel', 'camera', 'coins', 'moon', 'clock', 'page', 'text')
VAL_PHOTOS = ('coffee', 'chelsea')

# Two residual groups of one block each, 30 channels (the least the channel attention allows), N = 4:
# about 40x fewer operations per pixel than the official lightweight model, so a few minutes of one
# CPU core are enough to beat bicubic clearly.
NETWORK = dict(type='MambaIR', upscale=SCALE, in_chans=3, img_size=64, img_range=1.0, embed_dim=30,
               depths=[1, 1], d_state=4, mlp_ratio=1.2, upsampler='pixelshuffledirect', resi_connection='1conv')


def _photo(name: str) -> np.ndarray:
    """An RGB uint8 photograph bundled with scikit-image."""
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == 'motorcycle' else getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if name == 'retina':  # 1411 px of mostly black border: keep the centre
        img = img[300:1100, 300:1100]
    return np.ascontiguousarray(img[..., :3])


def build_dataset(root: Path) -> dict[str, Path]:
    """Write ``{train,val}/HR`` and ``{train,val}/LR_bicubic/X2`` PNGs (mod-cropped HR, MATLAB bicubic LR)."""
    import cv2

    from ..utils.matlab_resize import imresize_matlab

    folders = {}
    for split, names in (('train', TRAIN_PHOTOS), ('val', VAL_PHOTOS)):
        hr_dir, lr_dir = root / split / 'HR', root / split / 'LR_bicubic' / f'X{SCALE}'
        hr_dir.mkdir(parents=True, exist_ok=True)
        lr_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            hr = _photo(name)[..., ::-1]  # BGR, as OpenCV writes
            hr = hr[:hr.shape[0] - hr.shape[0] % SCALE, :hr.shape[1] - hr.shape[1] % SCALE]
            cv2.imwrite(str(hr_dir / f'{name}.png'), hr)
            cv2.imwrite(str(lr_dir / f'{name}x{SCALE}.png'), imresize_matlab(np.ascontiguousarray(hr), SCALE))
        folders[split] = root / split
    return folders


def _dataset(name: str, root: Path, phase: str) -> dict:
    opt = dict(name=name, type='PairedImageDataset', dataroot_gt=str(root / 'HR'),
               dataroot_lq=str(root / 'LR_bicubic' / f'X{SCALE}'), filename_tmpl=f'{{}}x{SCALE}',
               io_backend=dict(type='disk'))
    if phase == 'train':
        opt.update(gt_size=48, use_hflip=True, use_rot=True, use_shuffle=True, num_worker_per_gpu=1,
                   batch_size_per_gpu=16, dataset_enlarge_ratio=200, prefetch_mode=None)
    return opt


def _metrics() -> dict:
    return dict(psnr=dict(type='calculate_psnr', crop_border=SCALE, test_y_channel=True),
                ssim=dict(type='calculate_ssim', crop_border=SCALE, test_y_channel=True))


def train_options(data: dict[str, Path], iters: int) -> dict:
    return dict(
        name='demo_MambaIR_lightSR_x2', model_type='MambaIRModel', scale=SCALE, num_gpu='auto', manual_seed=10,
        datasets=dict(train=_dataset('skimage_photos', data['train'], 'train'),
                      val=_dataset('skimage_val', data['val'], 'val')),
        network_g=NETWORK,
        path=dict(pretrain_network_g=None, strict_load_g=True, resume_state=None),
        train=dict(optim_g=dict(type='Adam', lr=2e-3, weight_decay=0, betas=[0.9, 0.99]),
                   scheduler=dict(type='MultiStepLR', milestones=[iters // 2, iters * 3 // 4], gamma=0.5),
                   total_iter=iters, warmup_iter=-1, pixel_opt=dict(type='L1Loss', loss_weight=1.0, reduction='mean')),
        val=dict(val_freq=max(iters // 4, 1), save_img=False, tile=0, metrics=dict(psnr=_metrics()['psnr'])),
        logger=dict(print_freq=max(iters // 20, 1), save_checkpoint_freq=max(iters // 4, 1), use_tb_logger=True),
    )


def test_options(name: str, data: dict[str, Path], network: dict, weights: str | None) -> dict:
    return dict(
        name=name, model_type='MambaIRModel', scale=SCALE, num_gpu='auto', manual_seed=10,
        datasets=dict(test_1=_dataset('skimage_val', data['val'], 'val')),
        network_g=network, path=dict(pretrain_network_g=weights, strict_load_g=True),
        val=dict(save_img=True, suffix=None, tile=0, metrics=_metrics()))  # whole images


def _run(module: str, opt_file: Path, cwd: Path) -> None:
    cmd = [sys.executable, '-m', module, '-opt', str(opt_file)]
    print(f'\n$ {" ".join(cmd[2:])}', flush=True)
    if subprocess.run(cmd, cwd=cwd).returncode != 0:
        raise SystemExit(f'mambair-demo: {module} failed (see its log above)')


def _results(csv_path: Path) -> dict[str, float]:
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    return {'psnr': float(row['psnr']), 'ssim': float(row['ssim'])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='mambair-demo', description=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', type=Path, default=Path('demo'), help='where data and runs go (default ./demo)')
    parser.add_argument('--iters', type=int, default=800, help='training iterations (default 800)')
    parser.add_argument('--overwrite', action='store_true', help='start again if the work folder exists')
    args = parser.parse_args(argv)

    work = args.workdir.resolve()
    if work.exists() and any(work.iterdir()):
        if not args.overwrite:
            print(f'mambair-demo: error: {work} exists (use --overwrite to start again, or another --workdir)',
                  file=sys.stderr)
            return 2
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    # one core computes, the other loads data: on 2 cores more compute threads only contend (and collapse
    # when other work shares the machine)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    start = time.time()

    print(f'Building the x{SCALE} SR data set from scikit-image photographs in {work / "data"}', flush=True)
    data = build_dataset(work / 'data')
    opt_dir = work / 'options'
    opt_dir.mkdir()
    files = {}
    weights = work / 'experiments' / 'demo_MambaIR_lightSR_x2' / 'models' / 'net_g_latest.pth'
    for key, opt in (('train', train_options(data, args.iters)),
                     ('test', test_options('demo_MambaIR_lightSR_x2', data, NETWORK, str(weights))),
                     ('bicubic', test_options('demo_Bicubic_x2', data, dict(type='Bicubic', upscale=SCALE), None))):
        files[key] = opt_dir / f'{key}.yml'
        files[key].write_text(yaml.safe_dump(opt, sort_keys=False))

    _run('basicsr_mambair.train', files['train'], work)
    _run('basicsr_mambair.test', files['test'], work)
    _run('basicsr_mambair.test', files['bicubic'], work)

    ours = _results(work / 'results' / 'demo_MambaIR_lightSR_x2' / 'results.csv')
    bicubic = _results(work / 'results' / 'demo_Bicubic_x2' / 'results.csv')
    print(f'\nValidation ({", ".join(VAL_PHOTOS)}; x{SCALE}, Y channel, crop {SCALE}), '
          f'{time.time() - start:.0f} s in all:')
    print('| method | PSNR (dB) | SSIM |\n|---|---|---|')
    print(f"| MambaIR (demo, {args.iters} iterations) | {ours['psnr']:.2f} | {ours['ssim']:.4f} |")
    print(f"| bicubic | {bicubic['psnr']:.2f} | {bicubic['ssim']:.4f} |")
    print(f'TensorBoard: tensorboard --logdir {work / "tb_logger"}')
    if ours['psnr'] <= bicubic['psnr']:
        print('mambair-demo: error: the trained network does not beat bicubic', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
