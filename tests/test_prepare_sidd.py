"""mambair-prepare-sidd on SIDD-shaped folders of real SIDD crops and on small .mat files."""

from __future__ import annotations

import math
import shutil

import cv2
import numpy as np
import pytest
from helpers import run_cli
from scipy.io import savemat


def expected_patches(length: int, patch: int, overlap: int) -> int:
    if length < patch:
        return 0
    return math.ceil((length - patch) / (patch - overlap)) + 1


@pytest.fixture
def sidd_medium(tmp_path, shared_data):
    """Three real SIDD pairs (512, 1024 and 241 px) in the SIDD-Medium sRGB folder layout."""
    root = tmp_path / 'SIDD_Medium_Srgb' / 'Data'
    sizes = {}
    for scene, i in enumerate((0, 3, 11)):
        folder = root / f'{scene + 1:04d}_001_S6_00100_00060_3200_L'
        folder.mkdir(parents=True)
        for kind in ('NOISY', 'GT'):
            shutil.copy(shared_data / 'SIDD_samples' / kind / f'{kind}_{i}.png',
                        folder / f'{scene + 1:04d}_{kind}_SRGB_010.PNG')
        sizes[scene] = cv2.imread(str(folder / f'{scene + 1:04d}_GT_SRGB_010.PNG')).shape[:2]
    return root, sizes


def test_train_patches_count_names_and_content(tmp_path, sidd_medium):
    root, sizes = sidd_medium
    out = tmp_path / 'train'
    proc = run_cli('mambair-prepare-sidd', 'train', str(root), str(out), '--patch-size', '256', '--overlap', '64',
                   '--workers', '2', '--lmdb', cwd=tmp_path)
    expected = sum(expected_patches(h, 256, 64) * expected_patches(w, 256, 64) for h, w in sizes.values())
    inputs = sorted(p.name for p in (out / 'input_crops').iterdir())
    assert len(inputs) == expected == 9 + 25 and f'wrote {expected} patch pairs' in proc.stdout
    assert inputs == sorted(p.name for p in (out / 'target_crops').iterdir())
    # the first patch of the first scene is the top-left 256x256 of its source images
    src = root / '0001_001_S6_00100_00060_3200_L'
    first = inputs[0]
    assert first == '0001_SRGB_010_001.png'
    assert np.array_equal(cv2.imread(str(out / 'input_crops' / first)),
                          cv2.imread(str(src / '0001_NOISY_SRGB_010.PNG'))[:256, :256])
    assert np.array_equal(cv2.imread(str(out / 'target_crops' / first)),
                          cv2.imread(str(src / '0001_GT_SRGB_010.PNG'))[:256, :256])
    assert (out / 'input_crops.lmdb' / 'meta_info.txt').read_text().count('\n') == expected

    again = run_cli('mambair-prepare-sidd', 'train', str(root), str(out), cwd=tmp_path, check=False)
    assert again.returncode == 2 and 'use --overwrite' in again.stderr


def test_train_missing_ground_truth_is_one_clear_error(tmp_path, sidd_medium):
    root, _ = sidd_medium
    next(root.rglob('0002_GT_SRGB_010.PNG')).unlink()
    proc = run_cli('mambair-prepare-sidd', 'train', str(root), str(tmp_path / 'out'), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count('\n') == 0 and 'no ground truth for' in proc.stderr
    assert '0002_NOISY_SRGB_010.PNG' in proc.stderr


def test_validation_blocks_from_mat(tmp_path):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    clean = rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    savemat(tmp_path / 'ValidationNoisyBlocksSrgb.mat', {'ValidationNoisyBlocksSrgb': noisy})
    savemat(tmp_path / 'ValidationGtBlocksSrgb.mat', {'ValidationGtBlocksSrgb': clean})
    out = tmp_path / 'val'
    proc = run_cli('mambair-prepare-sidd', 'val', str(tmp_path), str(out), cwd=tmp_path)
    assert 'wrote 6 validation pairs' in proc.stdout
    assert sorted(p.name for p in (out / 'input').iterdir()) == [f'{i:04d}_{j:02d}.png' for i in range(2)
                                                                  for j in range(3)]
    img = cv2.imread(str(out / 'target' / '0001_02.png'))
    assert np.array_equal(img[..., ::-1], clean[1, 2])  # stored as BGR PNG, read back as RGB blocks


def test_validation_wrong_mat_key_is_one_clear_error(tmp_path):
    savemat(tmp_path / 'ValidationNoisyBlocksSrgb.mat', {'noisy': np.zeros((1, 1, 4, 4, 3), np.uint8)})
    savemat(tmp_path / 'ValidationGtBlocksSrgb.mat', {'ValidationGtBlocksSrgb': np.zeros((1, 1, 4, 4, 3), np.uint8)})
    proc = run_cli('mambair-prepare-sidd', 'val', str(tmp_path), str(tmp_path / 'val'), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "has no variable 'ValidationNoisyBlocksSrgb' (found: noisy)" in proc.stderr
    assert proc.stderr.strip().count('\n') == 0
