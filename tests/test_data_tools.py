"""The data-preparation console scripts on real benchmark images: exactness, layout, safety, errors."""

from __future__ import annotations

import os
import shutil

import cv2
import lmdb
import numpy as np
import pytest
from helpers import run_cli
from tiny_experiments import load_options

from basicsr_mambair.cli import extract_subimages, make_jpeg, make_lmdb, make_lr, make_meta_info

TOOLS = {
    'mambair-extract-subimages': extract_subimages,
    'mambair-make-lr': make_lr,
    'mambair-make-jpeg': make_jpeg,
    'mambair-make-lmdb': make_lmdb,
    'mambair-make-meta-info': make_meta_info,
}


def _pixels_differing(a_dir, b_dir, names):
    """Number of differing pixels between same-named images of two folders (shapes must match)."""
    total = 0
    for name in names:
        a, b = cv2.imread(str(a_dir / name), cv2.IMREAD_UNCHANGED), cv2.imread(str(b_dir / name), cv2.IMREAD_UNCHANGED)
        assert a is not None and b is not None and a.shape == b.shape, name
        total += int(np.count_nonzero(a != b))
    return total


def test_make_lr_reproduces_official_set5_bit_exactly(tmp_path, shared_data):
    """The console script (a real subprocess) remakes Set5 LR_bicubic/X2, X3, X4 from HR: 0 pixels differ."""
    set5 = shared_data / 'Set5'
    proc = run_cli('mambair-make-lr', str(set5 / 'HR'), str(tmp_path / 'LR'), '--scale', '2', '3', '4',
                   '--workers', '2', cwd=tmp_path)
    assert 'wrote the bicubic LR of 5 images' in proc.stdout
    for s in (2, 3, 4):
        names = sorted(p.name for p in (set5 / 'LR_bicubic' / f'X{s}').iterdir())
        assert sorted(p.name for p in (tmp_path / 'LR' / f'X{s}').iterdir()) == names
        assert _pixels_differing(tmp_path / 'LR' / f'X{s}', set5 / 'LR_bicubic' / f'X{s}', names) == 0, f'X{s}'


def test_make_lr_double_mode_and_the_difference_it_makes(tmp_path, shared_data):
    """X8 of Set5 was made without rounding between passes (--double reproduces it); the per-pass
    uint8 rounding of the default matters: without it X2 differs from the official files."""
    set5 = shared_data / 'Set5'
    assert make_lr.main([str(set5 / 'HR'), str(tmp_path / 'd'), '-s', '8', '--double', '-j', '1']) == 0
    names = sorted(p.name for p in (set5 / 'LR_bicubic' / 'X8').iterdir())
    assert _pixels_differing(tmp_path / 'd' / 'X8', set5 / 'LR_bicubic' / 'X8', names) == 0
    assert make_lr.main([str(set5 / 'HR'), str(tmp_path / 'd'), '-s', '2', '--double', '-j', '1']) == 0
    names = sorted(p.name for p in (set5 / 'LR_bicubic' / 'X2').iterdir())
    assert _pixels_differing(tmp_path / 'd' / 'X2', set5 / 'LR_bicubic' / 'X2', names) > 1000


def test_make_lr_gray_modcrop_hr_out_and_names(tmp_path, shared_data):
    src = tmp_path / 'src'
    src.mkdir()
    shutil.copy(shared_data / 'Set14' / 'HR' / 'bridge.png', src)  # 8-bit grayscale, 512x512
    shutil.copy(shared_data / 'T91' / 't1.bmp', src)
    assert make_lr.main([str(src), str(tmp_path / 'LR'), '-s', '3', '--hr-out', str(tmp_path / 'HR'), '-j', '1']) == 0
    for stem in ('bridge', 't1'):
        hr = cv2.imread(str(tmp_path / 'HR' / f'{stem}.png'), cv2.IMREAD_UNCHANGED)
        lr = cv2.imread(str(tmp_path / 'LR' / 'X3' / f'{stem}x3.png'), cv2.IMREAD_UNCHANGED)
        orig = cv2.imread(str(next(src.glob(f'{stem}.*'))), cv2.IMREAD_UNCHANGED)
        assert hr.ndim == lr.ndim == orig.ndim
        assert hr.shape[0] % 3 == 0 and hr.shape[1] % 3 == 0 and hr.shape[0] > orig.shape[0] - 3
        assert np.array_equal(hr, orig[:hr.shape[0], :hr.shape[1]])
        assert lr.shape[:2] == (hr.shape[0] // 3, hr.shape[1] // 3)
    assert make_lr.main([str(src), str(tmp_path / 'plain'), '-s', '2', '--no-suffix', '-j', '1']) == 0
    assert sorted(p.name for p in (tmp_path / 'plain' / 'X2').iterdir()) == ['bridge.png', 't1.png']


def test_extract_subimages_follows_basicsr_recipe(tmp_path, shared_data):
    src = shared_data / 'Kodak24' / 'full_768x512'
    hr_in, lr_in = tmp_path / 'hr', tmp_path / 'lr'
    hr_in.mkdir()
    for name in ('kodim01.png', 'kodim04.png'):  # 768x512 and 512x768
        shutil.copy(src / name, hr_in)
    assert make_lr.main([str(hr_in), str(lr_in), '-s', '2', '-j', '1']) == 0

    assert extract_subimages.main([str(hr_in), str(tmp_path / 'hr_sub'), '--crop-size', '240', '--step', '120',
                                   '-j', '2']) == 0
    assert extract_subimages.main([str(lr_in / 'X2'), str(tmp_path / 'lr_sub'), '--crop-size', '240', '--step', '120',
                                   '--scale', '2', '-j', '1']) == 0
    hr_names = sorted(p.name for p in (tmp_path / 'hr_sub').iterdir())
    # 512 -> windows at 0,120,240 + flush 272 (4); 768 -> 0..480 step 120 + flush 528 (6): 24 per image
    assert len(hr_names) == 48 and hr_names[0] == 'kodim01_s001.png' and hr_names[-1] == 'kodim04_s024.png'
    assert sorted(p.name for p in (tmp_path / 'lr_sub').iterdir()) == hr_names  # 'x2' dropped: names pair up
    img = cv2.imread(str(hr_in / 'kodim01.png'))
    assert np.array_equal(cv2.imread(str(tmp_path / 'hr_sub' / 'kodim01_s001.png')), img[:240, :240])
    assert np.array_equal(cv2.imread(str(tmp_path / 'hr_sub' / 'kodim01_s006.png')), img[:240, 528:])  # flush
    assert np.array_equal(cv2.imread(str(tmp_path / 'hr_sub' / 'kodim01_s024.png')), img[272:, 528:])
    lr = cv2.imread(str(lr_in / 'X2' / 'kodim01x2.png'))
    assert np.array_equal(cv2.imread(str(tmp_path / 'lr_sub' / 'kodim01_s024.png')), lr[136:, 264:])
    # BasicSR's defaults (480/240) skip images smaller than the crop instead of crashing
    small = tmp_path / 'small'
    small.mkdir()
    shutil.copy(shared_data / 'T91' / 't1.bmp', small)
    assert extract_subimages.main([str(small), str(tmp_path / 'small_sub'), '-j', '1']) == 0
    assert not any((tmp_path / 'small_sub').iterdir())


def test_make_jpeg_writes_official_layout_in_grayscale(tmp_path, shared_data):
    src = tmp_path / 'src'
    src.mkdir()
    shutil.copy(shared_data / 'Kodak24' / 'full_768x512' / 'kodim05.png', src)  # colour
    shutil.copy(shared_data / 'Classic5' / 'lena.bmp', src)  # gray BMP
    assert make_jpeg.main([str(src), str(tmp_path / 'out'), '-j', '2']) == 0
    out = tmp_path / 'out'
    assert sorted(p.name for p in out.iterdir()) == ['HQ', 'LQ']
    assert sorted(p.name for p in (out / 'LQ').iterdir()) == ['10', '30', '40']
    for stem in ('kodim05', 'lena'):
        gray = cv2.imread(str(next(src.glob(f'{stem}.*'))), cv2.IMREAD_GRAYSCALE)
        hq = cv2.imread(str(out / 'HQ' / f'{stem}.png'), cv2.IMREAD_UNCHANGED)
        assert hq.ndim == 2 and np.array_equal(hq, gray)
        errors = []
        for q in (10, 30, 40):
            content = (out / 'LQ' / str(q) / f'{stem}.jpg').read_bytes()
            assert content[:2] == b'\xff\xd8'  # a JPEG stream
            lq = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)
            assert lq.ndim == 2 and lq.shape == gray.shape
            errors.append(np.mean((lq.astype(float) - gray) ** 2))
        assert errors[0] > errors[1] > errors[2] > 0  # lower quality, larger error
    assert make_jpeg.main([str(src), str(tmp_path / 'colour'), '-q', '20', '--color', '--no-hq', '-j', '1']) == 0
    assert not (tmp_path / 'colour' / 'HQ').exists()
    assert cv2.imread(str(tmp_path / 'colour' / 'LQ' / '20' / 'kodim05.jpg'), cv2.IMREAD_UNCHANGED).shape[2] == 3


def test_make_lmdb_keys_meta_info_and_content(tmp_path, shared_data):
    set5 = shared_data / 'Set5'
    out = tmp_path / 'X2.lmdb'
    assert make_lmdb.main([str(set5 / 'LR_bicubic' / 'X2'), str(out), '--strip-suffix', 'x2', '-j', '2']) == 0
    lines = (out / 'meta_info.txt').read_text().splitlines()
    assert lines[0] == 'baby.png (256,256,3) 1'
    assert [line.split('.')[0] for line in lines] == ['baby', 'bird', 'butterfly', 'head', 'woman']
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        for key in ('baby', 'woman'):
            img = cv2.imdecode(np.frombuffer(txn.get(key.encode()), np.uint8), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(img, cv2.imread(str(set5 / 'LR_bicubic' / 'X2' / f'{key}x2.png')))
    env.close()


def test_make_meta_info_lists_what_realesrgan_dataset_reads(tmp_path, shared_data):
    """Paths relative to the root (the folders' common parent by default), readable back by BasicSR's
    RealESRGANDataset; a folder linked into the root stays inside it."""
    from basicsr.data.realesrgan_dataset import RealESRGANDataset

    root = tmp_path / 'hr'
    shutil.copytree(shared_data / 'Classic5', root / 'classic5')
    (root / 'set5').symlink_to(shared_data / 'Set5' / 'HR', target_is_directory=True)
    meta = tmp_path / 'meta_info.txt'
    proc = run_cli('mambair-make-meta-info', str(root / 'classic5'), str(root / 'set5'), '-o', str(meta),
                   cwd=tmp_path)
    assert proc.stdout.strip() == f'wrote 10 image paths to {meta} (relative to hr: use it as dataroot_gt)'
    lines = meta.read_text().splitlines()
    assert lines[:2] == ['classic5/baboon.bmp', 'classic5/barbara.bmp'] and lines[5:] == [
        'set5/baby.png', 'set5/bird.png', 'set5/butterfly.png', 'set5/head.png', 'set5/woman.png']
    # BasicSR's reader of the file, with the shipped option file's dataset options
    opt = dict(load_options('train/train_MambaIR_RealESRNet_x4.yml')['datasets']['train'], dataroot_gt=str(root),
               meta_info=str(meta))
    dataset = RealESRGANDataset(opt)
    assert dataset.paths == [os.path.join(str(root), line) for line in lines]
    assert tuple(dataset[9]['gt'].shape) == (3, 400, 400)  # woman.png (344x228), padded to 400 by BasicSR
    # one folder: it is the root; outside --root or a name with a space: one line each
    assert make_meta_info.main([str(root / 'set5'), '-o', str(tmp_path / 'm2.txt'), '-j', '1']) == 0
    assert (tmp_path / 'm2.txt').read_text().splitlines()[0] == 'baby.png'
    assert make_meta_info.main([str(root / 'set5'), '-o', str(tmp_path / 'm3.txt'), '--root',
                                str(root / 'classic5')]) == 2
    (root / 'with space').mkdir()
    shutil.copy(shared_data / 'Classic5' / 'lena.bmp', root / 'with space')
    assert make_meta_info.main([str(root / 'with space'), '-o', str(tmp_path / 'm4.txt'), '--root', str(root)]) == 2
    assert not (tmp_path / 'm3.txt').exists() and not (tmp_path / 'm4.txt').exists()


@pytest.mark.parametrize('prog', sorted(TOOLS))
def test_help(prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[prog].main(['--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f'usage: {prog}') and '--overwrite' in out and '--workers' in out


def test_refuse_existing_output_unless_overwrite(tmp_path, shared_data, capsys):
    classic5 = shared_data / 'Classic5'
    runs = {
        'mambair-make-jpeg': [str(classic5), str(tmp_path / 'jpeg'), '-q', '10'],
        'mambair-make-lr': [str(classic5), str(tmp_path / 'lr'), '-s', '2'],
        'mambair-extract-subimages': [str(classic5), str(tmp_path / 'sub'), '--crop-size', '256', '--step', '256'],
        'mambair-make-lmdb': [str(classic5), str(tmp_path / 'c5.lmdb')],
        'mambair-make-meta-info': [str(classic5), '-o', str(tmp_path / 'meta_info.txt')],
    }
    for prog, args in runs.items():
        assert TOOLS[prog].main([*args, '-j', '1']) == 0, prog
        capsys.readouterr()
        assert TOOLS[prog].main([*args, '-j', '1']) == 2, prog
        err = capsys.readouterr().err.strip()
        assert err.startswith(f'{prog}: error: ') and 'use --overwrite' in err and '\n' not in err, err
        assert TOOLS[prog].main([*args, '-j', '1', '--overwrite']) == 0, prog
    assert len((tmp_path / 'c5.lmdb' / 'meta_info.txt').read_text().splitlines()) == 5  # replaced, not appended


def test_bad_input_gives_one_line(tmp_path, shared_data, capfd):
    bad = tmp_path / 'bad'
    bad.mkdir()
    shutil.copy(shared_data / 'Classic5' / 'lena.bmp', bad)
    (bad / 'zz_broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    cases = [
        ('mambair-make-lr', [str(tmp_path / 'missing'), str(tmp_path / 'o1'), '-s', '2'], 'input folder not found'),
        ('mambair-make-jpeg', [str(bad), str(tmp_path / 'o2')], 'cannot decode image'),
        ('mambair-make-lmdb', [str(bad), str(tmp_path / 'o3.lmdb')], 'cannot decode image'),
        ('mambair-make-lmdb', [str(bad), str(tmp_path / 'o4')], "must end in '.lmdb'"),
        ('mambair-extract-subimages', [str(bad), str(tmp_path / 'o5'), '--scale', '7'], 'not divisible by --scale 7'),
        ('mambair-make-meta-info', [str(bad), '-o', str(tmp_path / 'o6.txt')], 'cannot decode image'),
    ]
    for prog, args, message in cases:
        assert TOOLS[prog].main([*args, '-j', '2']) == 2, prog
        err = capfd.readouterr().err
        last = err.strip().splitlines()[-1]  # after the progress bar, if one was shown
        assert last.startswith(f'{prog}: error: ') and message in last, err
        assert 'Traceback' not in err and 'grfmt' not in err, err  # no traceback, no OpenCV log noise
        if message == 'cannot decode image':
            assert 'zz_broken.png' in last
    assert not (tmp_path / 'o3.lmdb').exists(), 'a failed LMDB must not be left behind'
    assert not (tmp_path / 'o6.txt').exists(), 'no meta-info file listing a broken image'
