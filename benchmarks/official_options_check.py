"""Run a folder of option files (e.g. the official MambaIR ones) through ``mambair-train`` / ``mambair-test``.

Each file is run as it is except for what cannot be the same on this machine: its data roots (filled with
small images made from real photographs, in the layout its datasets read: SR pairs with ``filename_tmpl``,
denoising clean images, CAR ``HQ`` + ``LQ/<q>/<name>.jpg``, realDN noisy/clean pairs; a list of roots gets one
folder per entry), its pretrained weights (a randomly initialised checkpoint of its ``network_g``), iteration
counts and frequencies (``--iters``), ``batch_size_per_gpu`` (``--batch``), data-loader workers (0) and the
TensorBoard/wandb loggers (off). ``num_gpu``, networks, losses, schedulers and every dialect key stay.
Prints one row per file: OK, or the one-line error the command gave.

With ``--data-check`` (default on) every denoising and CAR test file also runs with the identity network
(``Bicubic``, scale 1) in place of its own, and the PSNR it reports must equal the one computed here the
official way (``np.random.seed(0)`` noise; the JPEG files themselves).

    python benchmarks/official_options_check.py ~/MambaIR/options ~/MambaIR/realDenoising/options
    python benchmarks/official_options_check.py options --tiny --iters 1 --work /tmp/check
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import basicsr_mambair  # noqa: E402,F401  (registers the archs; torchvision alias for BasicSR)

# small networks of each family for --tiny (the channel attention needs >= 30 channels in MambaIR)
TINY = {
    'MambaIR': dict(embed_dim=30, depths=[1], d_state=4, mlp_ratio=1.0),
    'MambaIRv2': dict(embed_dim=24, depths=[1], num_heads=[2], window_size=8, inner_rank=8, num_tokens=8,
                      d_state=4, mlp_ratio=1.0),
    'MambaIRUNet': dict(dim=32, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1),
}
TINY['MambaIRv2Light'] = TINY['MambaIRv2']
ROOT_KEYS = ('dataroot_gt', 'dataroot_lq')


def photos(folder: Path | None) -> list[np.ndarray]:
    """Real BGR photographs: the images of ``folder``, or scikit-image's bundled ones."""
    if folder is not None:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in ('.png', '.jpg', '.bmp', '.tif'))
        return [cv2.imread(str(p)) for p in paths[:2]]
    import skimage.data

    return [np.ascontiguousarray(getattr(skimage.data, name)()[..., ::-1]) for name in ('astronaut', 'coffee')]


def crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        img = cv2.resize(img, (max(w, size), max(h, size)), interpolation=cv2.INTER_CUBIC)
        h, w = img.shape[:2]
    return np.ascontiguousarray(img[(h - size) // 2:(h - size) // 2 + size, (w - size) // 2:(w - size) // 2 + size])


def dataset_kind(ds: dict) -> str:
    """'sr' | 'dn_color' | 'dn_gray' | 'car' | 'pairs' (realDN) | '' (unknown: roots left as they are)."""
    kind = ds.get('type')
    if kind == 'Dataset_PairedImage':
        return 'pairs'
    if kind == 'PairedImageDataset':
        return {None: 'sr', 'SR': 'sr', 'denoising_color': 'dn_color', 'denoising_gray': 'dn_gray',
                'CAR': 'car'}.get(ds.get('task'), 'sr')
    if kind == 'GaussianNoiseDataset':
        return 'dn_gray' if ds.get('gray') else 'dn_color'
    if kind == 'JPEGArtifactDataset':
        return 'car'
    return ''


def make_data(ds: dict, kind: str, folder: Path, images: list[np.ndarray], scale: int, size: int) -> dict:
    """Write one root's images; return its root keys (dataroot_gt and, where read, dataroot_lq)."""
    from basicsr_mambair.data.util import encode_jpeg
    from basicsr_mambair.utils.matlab_resize import imresize_matlab

    size -= size % scale
    gt_dir, lq_dir = folder / 'GT', folder / 'LQ'
    gt_dir.mkdir(parents=True, exist_ok=True)
    roots = {'dataroot_gt': str(gt_dir)}
    tmpl = ds.get('filename_tmpl', '{}')
    lq_root = ds.get('dataroot_lq')
    lq_root = lq_root[0] if isinstance(lq_root, list) and lq_root else lq_root
    if kind == 'sr' and scale == 1:  # a scale-1 paired set (real denoising): noisy / clean pairs
        kind = 'pairs'
    quality = int(Path(str(lq_root)).name) if lq_root and Path(str(lq_root)).name.isdigit() else 10
    if kind == 'car' and lq_root:
        lq_dir = folder / 'LQ' / str(quality)
    for k, img in enumerate(images):
        hr = crop(img, size)
        name = f'img{k}'
        if kind in ('dn_gray', 'car'):
            hr = cv2.cvtColor(hr, cv2.COLOR_BGR2GRAY)
        cv2.imwrite(str(gt_dir / f'{name}.png'), hr)
        if kind == 'sr':
            lq_dir.mkdir(exist_ok=True)
            cv2.imwrite(str(lq_dir / f'{tmpl.format(name)}.png'), imresize_matlab(hr, scale))
        elif kind == 'car' and lq_root:
            lq_dir.mkdir(parents=True, exist_ok=True)
            (lq_dir / f'{tmpl.format(name)}.jpg').write_bytes(encode_jpeg(hr, quality))
        elif kind == 'pairs':
            lq_dir.mkdir(exist_ok=True)
            noisy = np.clip(hr + np.random.default_rng(k).normal(0, 10, hr.shape), 0, 255).round().astype(np.uint8)
            cv2.imwrite(str(lq_dir / f'{tmpl.format(name)}.png'), noisy)
    if kind in ('sr', 'pairs') or (kind == 'car' and lq_root):
        roots['dataroot_lq'] = str(lq_dir)
    elif kind.startswith('dn') and lq_root:
        roots['dataroot_lq'] = str(gt_dir)  # the official files point it at the clean images
    return roots


def prepare(opt: dict, work: Path, images: list[np.ndarray], args: argparse.Namespace) -> dict:
    """A copy of ``opt`` with its data, weights and schedule replaced (see the module docstring)."""
    import torch
    from basicsr.archs import build_network

    opt = copy.deepcopy(opt)
    scale = int(opt.get('scale', 1))
    net = opt.get('network_g') or {}
    if args.tiny and net.get('type') in TINY:
        net.update(TINY[net['type']])
    for phase, ds in (opt.get('datasets') or {}).items():
        kind = dataset_kind(ds)
        if not kind:
            continue
        is_train = phase == 'train'
        size = max([int(ds.get('gt_size', 0)), *[int(s) for s in ds.get('gt_sizes', [])], args.test_size]) \
            if is_train else args.test_size
        count = max((len(ds[k]) for k in ROOT_KEYS if isinstance(ds.get(k), list)), default=0)
        parts = [make_data(ds, kind, work / 'data' / phase / str(i), images, scale, size) for i in range(count or 1)]
        for key in ROOT_KEYS:
            if key in ds:
                ds[key] = [p.get(key, p['dataroot_gt']) for p in parts] if count else parts[0].get(key, ds[key])
        if is_train:
            ds.update(num_worker_per_gpu=0)
            if args.batch:
                ds['batch_size_per_gpu'] = args.batch
                if ds.get('mini_batch_sizes'):
                    ds['mini_batch_sizes'] = [min(b, args.batch) for b in ds['mini_batch_sizes']]
    path = opt.setdefault('path', {})
    if path.get('pretrain_network_g'):
        weights = work / 'pretrained.pth'
        torch.save({'params': build_network(copy.deepcopy(net)).state_dict()}, weights)
        path['pretrain_network_g'] = str(weights)
    if 'train' in opt:
        opt['train']['total_iter'] = args.iters
        opt.setdefault('val', {})['val_freq'] = args.iters
        logger = opt.setdefault('logger', {})
        logger.update(print_freq=1, save_checkpoint_freq=args.iters, use_tb_logger=False)
        logger.pop('wandb', None)
    return opt


def run_file(yml: Path, opt: dict, work: Path, timeout: float) -> tuple[bool, str, float]:
    """Run the command for ``opt`` (written to ``work``); (ok, one-line result, seconds)."""
    module = 'basicsr_mambair.train' if 'train' in opt else 'basicsr_mambair.test'
    opt_file = work / yml.name
    opt_file.write_text(yaml.safe_dump(opt, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, '-m', module, '-opt', str(opt_file)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f'timed out after {timeout:.0f} s', time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return True, 'OK', seconds
    errors = [line for line in proc.stderr.splitlines() if ': error: ' in line] or proc.stderr.strip().splitlines()
    return False, (errors[-1] if errors else f'exit status {proc.returncode}'), seconds


def expected_psnr(ds: dict, kind: str) -> float:
    """Mean PSNR of the identity network's output on a denoising / CAR test set, computed the official way."""
    from basicsr.metrics import calculate_psnr

    values = []
    for gt_path in sorted(Path(ds['dataroot_gt']).glob('*.png')):
        if kind == 'car':
            gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)
            lq = cv2.imread(str(Path(ds['dataroot_lq']) / f'{gt_path.stem}.jpg'), cv2.IMREAD_GRAYSCALE)
        else:
            flag = cv2.IMREAD_GRAYSCALE if kind == 'dn_gray' else cv2.IMREAD_COLOR
            gt = cv2.imread(str(gt_path), flag)
            np.random.seed(seed=0)  # the official validation noise, then BasicSR's tensor2img
            noisy = gt.astype(np.float32) / 255. + np.random.normal(0, float(ds['noise']) / 255., gt.shape)
            lq = (np.clip(noisy.astype(np.float32), 0, 1) * 255.0).round().astype(np.uint8)
        y = bool((ds.get('_metric') or {}).get('test_y_channel'))
        values.append(calculate_psnr(lq, gt, crop_border=0, test_y_channel=y))
    return float(np.mean(values))


def data_check(yml: Path, opt: dict, work: Path, timeout: float) -> str:
    """Identity-network run of a denoising / CAR test file: its PSNR against the official computation."""
    datasets = opt.get('datasets') or {}
    first = next(iter(datasets.values()), {})
    kind = dataset_kind(first)
    if 'train' in opt or kind not in ('dn_color', 'dn_gray', 'car') or 'psnr' not in (opt['val'].get('metrics') or {}):
        return ''
    if (kind == 'car' and not first.get('dataroot_lq')) or first.get('val_noise_seed', 0) != 0:
        return ''  # JPEGs encoded on the fly / another validation seed: nothing official to compare with
    check = copy.deepcopy(opt)
    check['name'] = f"{opt['name']}_identity"
    check['network_g'] = {'type': 'Bicubic', 'upscale': 1}
    check['path'] = {'pretrain_network_g': None, 'strict_load_g': True}
    check['datasets'] = {'test_1': first}
    ok, line, _ = run_file(yml.with_name(yml.stem + '_identity.yml'), check, work, timeout)
    if not ok:
        return f'identity run failed: {line}'
    with open(work / 'results' / check['name'] / 'results.csv') as f:
        got = float(next(csv.DictReader(f))['psnr'])
    expected = expected_psnr(dict(first, _metric=opt['val']['metrics']['psnr']), kind)
    verdict = 'OK' if abs(got - expected) < 1e-6 else 'MISMATCH'
    return f'identity PSNR {got:.4f} dB, official {expected:.4f} dB: {verdict}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folders', nargs='+', type=Path, help='folders searched for *.yml (recursively)')
    parser.add_argument('--work', type=Path, default=None, help='where data and runs go (default: a temp folder)')
    parser.add_argument('--images', type=Path, default=None, help='photos to cut data from (default: scikit-image)')
    parser.add_argument('--iters', type=int, default=2, help='training iterations (default 2)')
    parser.add_argument('--batch', type=int, default=1, help='batch_size_per_gpu of training (0 = the file\'s)')
    parser.add_argument('--test-size', type=int, default=96, help='side of the GT test images (default 96)')
    parser.add_argument('--tiny', action='store_true', help='small networks of the same families (fast)')
    parser.add_argument('--no-data-check', dest='data_check', action='store_false')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per run (default 1800)')
    parser.add_argument('--csv', type=Path, default=None, help='also write the rows as CSV')
    args = parser.parse_args(argv)

    files = sorted({p for folder in args.folders for p in folder.rglob('*.yml')})
    work_root = args.work or Path(tempfile.mkdtemp(prefix='official_options_'))
    images = photos(args.images)
    print(f'{len(files)} option files; work folder {work_root}; {describe()}', flush=True)
    rows, failed = [], 0
    for yml in files:
        work = work_root / re.sub(r'\W', '_', str(yml.relative_to(yml.parents[1])).removesuffix('.yml'))
        work.mkdir(parents=True, exist_ok=True)
        opt = yaml.safe_load(yml.read_text())
        try:
            opt = prepare(opt, work, images, args)
        except Exception as e:  # noqa: BLE001 - a file this script cannot prepare is a row, not a crash
            ok, line, seconds, check = False, f'not prepared: {type(e).__name__}: {e}', 0.0, ''
        else:
            ok, line, seconds = run_file(yml, opt, work, args.timeout)
            check = data_check(yml, opt, work, args.timeout) if ok and args.data_check else ''
        failed += (not ok) or 'MISMATCH' in check or 'failed' in check
        rows.append([str(yml), 'train' if 'train' in opt else 'test', line, f'{seconds:.0f}', check])
        print(f'{yml.name}: {line} ({seconds:.0f} s){"; " + check if check else ""}', flush=True)
    print(f'\n{len(files) - failed} of {len(files)} OK')
    if args.csv:
        with open(args.csv, 'w', newline='') as f:
            csv.writer(f).writerows([['file', 'command', 'result', 'seconds', 'data check'], *rows])
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
