"""``--overwrite`` of the data tools never deletes what the tool did not write, nor anything before the new result
exists, and outputs never overlap the inputs (issue 16, item 1). Real images, real commands."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from helpers import run_cli
from scipy.io import savemat

from basicsr_mambair.cli import extract_subimages, make_jpeg, make_lmdb, make_lr


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(('\r', ' '))]
    assert 'Traceback' not in err and lines and lines[-1].startswith(f'{prog}: error: '), err
    return lines[-1]


def no_staging_left(folder: Path) -> None:
    assert not [p for p in folder.rglob('.*') if '.partial' in p.name or '.replaced' in p.name]


@pytest.fixture
def photos(tmp_path: Path, shared_data: Path) -> Path:
    """Three real 8-bit images (colour, gray, colour) in ``tmp_path/in``."""
    src = tmp_path / 'in'
    src.mkdir()
    shutil.copy(shared_data / 'Set5' / 'HR' / 'baby.png', src)
    shutil.copy(shared_data / 'Set14' / 'HR' / 'bridge.png', src)
    shutil.copy(shared_data / 'Set5' / 'HR' / 'bird.png', src)
    return src


def test_outputs_that_are_or_hold_the_inputs_are_refused(tmp_path: Path, photos: Path, capsys) -> None:
    """The issue's commands (``make-lr HR LR --hr-out HR``, an LMDB or sub-images written onto their input, JPEG
    outputs onto the HQ input folder): one line, exit 2, every input byte for byte as before."""
    before = snapshot(tmp_path)
    x2 = tmp_path / 'lr' / 'X2'
    shutil.copytree(photos, x2)
    before_x2 = snapshot(x2)
    hq = tmp_path / 'car' / 'HQ'
    shutil.copytree(photos, hq)
    lmdb_in = tmp_path / 'images.lmdb'
    shutil.copytree(photos, lmdb_in)
    cases = [
        (make_lr, 'mambair-make-lr', [str(photos), str(tmp_path / 'o'), '-s', '3', '--hr-out', str(photos)], photos),
        (make_lr, 'mambair-make-lr', [str(x2), str(tmp_path / 'lr'), '-s', '2'], x2),
        (make_jpeg, 'mambair-make-jpeg', [str(hq), str(tmp_path / 'car')], hq),
        (extract_subimages, 'mambair-extract-subimages', [str(photos), str(photos), '--crop-size', '64',
                                                          '--step', '64'], photos),
        (extract_subimages, 'mambair-extract-subimages', [str(photos), str(tmp_path)], photos),
        (make_lmdb, 'mambair-make-lmdb', [str(lmdb_in), str(lmdb_in)], lmdb_in),
    ]
    for tool, prog, args, given in cases:
        assert tool.main([*args, '-j', '1', '--overwrite']) == 2, args
        line = one_error_line(capsys, prog)
        assert 'choose an output folder outside the inputs' in line and str(given) in line, line
    assert snapshot(photos) == {k[len('in/'):]: v for k, v in before.items()}
    assert snapshot(x2) == before_x2 == snapshot(hq) == snapshot(lmdb_in)
    assert not (tmp_path / 'o').exists() and not (tmp_path / 'car' / 'LQ').exists()
    no_staging_left(tmp_path)


def test_prepare_sidd_never_deletes_its_inputs(tmp_path: Path, shared_data: Path) -> None:
    """``mambair-prepare-sidd val D D --overwrite`` deleted the user's .mat files, ``train Data Data`` the input
    tree: refused in one line, inputs unchanged."""
    d = tmp_path / 'D'
    d.mkdir()
    blocks = np.random.default_rng(0).integers(0, 256, (1, 2, 8, 8, 3), dtype=np.uint8)
    savemat(d / 'ValidationNoisyBlocksSrgb.mat', {'ValidationNoisyBlocksSrgb': blocks})
    savemat(d / 'ValidationGtBlocksSrgb.mat', {'ValidationGtBlocksSrgb': blocks})
    data = tmp_path / 'SIDD' / 'Data' / '0001_001_S6_00100_00060_3200_L'
    data.mkdir(parents=True)
    for kind in ('NOISY', 'GT'):
        shutil.copy(shared_data / 'SIDD_samples' / kind / f'{kind}_11.png', data / f'0001_{kind}_SRGB_010.PNG')
    before = snapshot(tmp_path)
    for args in (['val', str(d), str(d)], ['train', str(data.parent), str(data.parent)],
                 ['train', str(data.parent), str(tmp_path / 'SIDD')]):
        proc = run_cli('mambair-prepare-sidd', *args, '--overwrite', cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0, proc.stderr
        assert 'choose an output folder outside the inputs' in proc.stderr
    assert snapshot(tmp_path) == before


def test_failed_overwrite_keeps_the_old_result(tmp_path: Path, photos: Path, capsys) -> None:
    """An LMDB rebuild that fails on a corrupt image kept nothing before (the old LMDB and unrelated files in its
    folder were deleted first); now the old LMDB stays as it was, and a rerun replaces only the LMDB's files."""
    out = tmp_path / 'photos.lmdb'
    assert make_lmdb.main([str(photos), str(out), '-j', '1']) == 0
    (out / 'NOTES.txt').write_text('mine')
    before = snapshot(out)
    (photos / 'zz_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    capsys.readouterr()
    assert make_lmdb.main([str(photos), str(out), '-j', '1', '--overwrite']) == 2
    assert 'zz_corrupt.png' in one_error_line(capsys, 'mambair-make-lmdb')
    assert snapshot(out) == before
    no_staging_left(tmp_path)

    (photos / 'zz_corrupt.png').unlink()
    shutil.copy(photos / 'bird.png', photos / 'bird2.png')
    assert make_lmdb.main([str(photos), str(out), '-j', '1', '--overwrite']) == 0
    assert (out / 'NOTES.txt').read_text() == 'mine'
    assert sorted(p.name for p in out.iterdir()) == ['NOTES.txt', 'data.mdb', 'lock.mdb', 'meta_info.txt']
    assert [line.split('.')[0] for line in (out / 'meta_info.txt').read_text().splitlines()] == [
        'baby', 'bird', 'bird2', 'bridge']
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        stored = cv2.imdecode(np.frombuffer(txn.get(b'bird2'), np.uint8), cv2.IMREAD_UNCHANGED)
    env.close()
    assert np.array_equal(stored, cv2.imread(str(photos / 'bird.png'), cv2.IMREAD_UNCHANGED))
    no_staging_left(tmp_path)


def test_overwrite_replaces_only_the_tools_own_files(tmp_path: Path, photos: Path, capsys) -> None:
    """Sub-images: the user's other files in the folder are kept, stale sub-images of an earlier run removed, a
    failing run changes nothing; make-lr: same-named results replaced, other files kept."""
    out = tmp_path / 'sub'
    args = [str(photos), str(out), '--crop-size', '256', '--step', '256', '--thresh-size', '40', '-j', '1']
    assert extract_subimages.main(args) == 0
    first = sorted(p.name for p in out.iterdir())
    assert first == ['baby_s001.png', 'baby_s002.png', 'baby_s003.png', 'baby_s004.png', 'bird_s001.png',
                     'bridge_s001.png', 'bridge_s002.png', 'bridge_s003.png', 'bridge_s004.png']
    (out / 'README.md').write_text('notes')
    (out / 'old_s001.png').write_bytes((out / 'bird_s001.png').read_bytes())  # from an earlier input set
    (photos / 'zz_corrupt.png').write_bytes(b'not an image')
    before = snapshot(out)
    capsys.readouterr()
    assert extract_subimages.main([*args, '--overwrite']) == 2
    assert 'zz_corrupt.png' in one_error_line(capsys, 'mambair-extract-subimages')
    assert snapshot(out) == before  # nothing deleted or replaced before the new result existed
    (photos / 'zz_corrupt.png').unlink()
    (photos / 'bird.png').unlink()
    assert extract_subimages.main([*args, '--overwrite']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', *[n for n in first if not n.startswith('bird')]]
    baby = cv2.imread(str(photos / 'baby.png'))
    assert np.array_equal(cv2.imread(str(out / 'baby_s004.png')), baby[256:, 256:])
    no_staging_left(tmp_path)

    lr = tmp_path / 'lr'
    assert make_lr.main([str(photos), str(lr), '-s', '2', '-j', '1']) == 0
    (lr / 'X2' / 'mine.txt').write_text('keep')
    (lr / 'X2' / 'babyx2.png').write_bytes(b'stale')
    assert make_lr.main([str(photos), str(lr), '-s', '2', '-j', '1', '--overwrite']) == 0
    assert sorted(p.name for p in (lr / 'X2').iterdir()) == ['babyx2.png', 'bridgex2.png', 'mine.txt']
    assert cv2.imread(str(lr / 'X2' / 'babyx2.png')).shape == (256, 256, 3)
    no_staging_left(tmp_path)
