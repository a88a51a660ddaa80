"""NaN/Inf never becomes an image or a PSNR (issue 16, item 4): weights with NaN are refused at load naming the
tensor, NaN pixels are one line for their image, a forward that overflows stops that image, and mambair-test
fails instead of reporting a metric of black images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import TINY_MAMBAIR, run_cli, tiny_checkpoint
from tiny_experiments import make_sr_pairs, sr_test_options, write_options

from basicsr_mambair.api import load_model, restore
from basicsr_mambair.errors import CheckpointError, ImageError

NAN_KEY = 'layers.0.residual_group.blocks.0.self_attention.A_logs'


def _plant_nan(state: dict) -> None:
    state[NAN_KEY].view(-1)[3] = float('nan')


def _overflow(state: dict) -> None:  # finite weights whose output exceeds float32: Inf, then NaN
    state['upsample.0.weight'].fill_(3e38)


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp('weights')
    return {'good': tiny_checkpoint(folder / 'good.pth'), 'nan': tiny_checkpoint(folder / 'nan.pth', edit=_plant_nan),
            'overflow': tiny_checkpoint(folder / 'overflow.pth', edit=_overflow)}


@pytest.fixture(scope='module')
def sr_data(tmp_path_factory):
    return make_sr_pairs(tmp_path_factory.mktemp('sr_data'), per_photo=1, size=48)


def one_error(proc, prog: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f'{prog}: error: ')]
    assert 'Traceback' not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


def test_nan_checkpoint_is_refused_at_load(weights, sr_data, tmp_path: Path) -> None:
    """A checkpoint with one NaN: all-black images and exit 0 before; now one line naming the tensor, exit 2."""
    with pytest.raises(CheckpointError, match=f'tensor {NAN_KEY} holds 1 NaN/Inf values of'):
        load_model(weights['nan'])
    hr, lr = sr_data
    proc = run_cli('mambair-restore', str(lr), '-o', str(tmp_path / 'out'), '--weights', str(weights['nan']),
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2 and NAN_KEY in one_error(proc, 'mambair-restore')
    assert not (tmp_path / 'out').exists()


def _test_options(tmp_path: Path, sr_data, weights: Path) -> Path:
    hr, lr = sr_data
    return write_options(tmp_path / 'test.yml',
                         sr_test_options('nonfinite', hr, lr, dict(type='MambaIR', **TINY_MAMBAIR), weights))


@pytest.mark.parametrize(('kind', 'message'), [('nan', f'tensor {NAN_KEY} holds 1 NaN/Inf'),
                                               ('overflow', 'the network produced')])
def test_mambair_test_fails_instead_of_reporting_a_psnr(kind: str, message: str, weights, sr_data,
                                                        tmp_path: Path) -> None:
    """NaN weights gave 'PSNR 7.02' without a word: now the load (pretrain_network_g, the path training takes
    too) or the first non-finite output stops the run with one line; no image, no table is left."""
    proc = run_cli('mambair-test', '-opt', str(_test_options(tmp_path, sr_data, weights[kind])), cwd=tmp_path,
                   check=False)
    line = one_error(proc, 'mambair-test')
    assert proc.returncode == 1 and message in line, proc.stderr
    assert '# psnr:' not in proc.stdout + proc.stderr  # BasicSR's metric line
    assert not (tmp_path / 'results').exists()


def test_overflowing_forward_stops_each_image(weights, sr_data, tmp_path: Path) -> None:
    hr, lr = sr_data
    model = load_model(weights['overflow'])  # every weight finite: loads
    image = cv2.imread(str(next(lr.iterdir())))[..., ::-1]
    with pytest.raises(ImageError, match='the network produced .* NaN/Inf values'):
        restore(model, image)
    proc = run_cli('mambair-restore', str(lr), '-o', str(tmp_path / 'out'), '--weights', str(weights['overflow']),
                   cwd=tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if 'error:' in line]
    assert proc.returncode == 1 and len(errors) == len(list(lr.iterdir())), proc.stderr
    assert all('the network produced' in line for line in errors) and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'out').exists()  # nothing written: no folder left either


def test_nan_pixels_are_one_line_for_their_image(weights, tmp_path: Path, shared_data: Path) -> None:
    """A float TIFF with one NaN pixel gave an all-black PNG, restore() NaN everywhere."""
    model = load_model(weights['good'])
    rgb = cv2.imread(str(shared_data / 'Set5' / 'HR' / 'bird.png'))[100:120, 100:124, ::-1].astype(np.float32) / 255
    rgb[5, 7, 1] = np.nan
    with pytest.raises(ImageError, match='the image has 1 NaN/Inf values'):
        restore(model, rgb)
    folder = tmp_path / 'in'
    folder.mkdir()
    assert cv2.imwrite(str(folder / 'a_nan.tif'), np.ascontiguousarray(rgb[..., ::-1]))
    assert cv2.imwrite(str(folder / 'b_ok.png'), np.round(np.nan_to_num(rgb[..., ::-1]) * 255).astype(np.uint8))
    proc = run_cli('mambair-restore', str(folder), '-o', str(tmp_path / 'out'), '--weights', str(weights['good']),
                   cwd=tmp_path, check=False)
    line = one_error(proc, 'mambair-restore')
    assert proc.returncode == 1 and 'NaN/Inf' in line and 'a_nan.tif' in line
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['b_ok_x2.png']
