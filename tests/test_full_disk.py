"""A full disk (ENOSPC) never leaves a corrupt result under its final name, costs one line, and a rerun completes
what failed (issue 16, item 3): restore, the data tools, checkpoints and training. Faults come from a writer that
raises ENOSPC half-way, and, where ``unshare -m`` is allowed, from a real tmpfs that is too small."""

from __future__ import annotations

import errno
import logging
import os
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import TINY_MAMBAIR, cli_command, mount_namespace, shell_words, tiny_checkpoint
from tiny_experiments import make_sr_pairs, sr_train_options, write_options

from basicsr_mambair import compat
from basicsr_mambair.cli import make_lr
from basicsr_mambair.cli import restore as restore_cli
from basicsr_mambair.utils import files
from basicsr_mambair.utils.checkpoint import save_atomic


class _HalfThenFull:
    """A file whose first ``write`` stores half of the data and then fails as a full disk does."""

    def __init__(self, f) -> None:
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data) -> int:
        data = bytes(data)
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_for(monkeypatch, *names: str) -> None:
    """Writes of files whose name contains one of ``names`` fail half-way with ENOSPC (utils.files' writer)."""
    real_open = open

    def fake_open(path, mode='r', *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if 'w' in mode and any(name in Path(path).name for name in names):
            return _HalfThenFull(f)
        return f

    monkeypatch.setattr(files, 'open', fake_open, raising=False)


def hidden_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob('.*')]


@pytest.fixture(scope='module')
def tiny_weights(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp('weights') / 'tiny_x2.pth')


@pytest.fixture(scope='module')
def crops(tmp_path_factory, shared_data: Path) -> Path:
    """Three real 24x24 colour crops (their x2 results are ~7 KB PNGs)."""
    folder = tmp_path_factory.mktemp('crops')
    for name, (y, x) in (('a', (100, 100)), ('b', (200, 180)), ('c', (300, 260))):
        image = cv2.imread(str(shared_data / 'Set5' / 'HR' / 'baby.png'))[y:y + 24, x:x + 24]
        assert cv2.imwrite(str(folder / f'{name}.png'), np.ascontiguousarray(image))
    return folder


def test_restore_on_a_full_disk_leaves_no_partial_result_and_a_rerun_completes(
        tmp_path: Path, crops: Path, tiny_weights: Path, monkeypatch, capsys) -> None:
    args = [str(crops), '-o', str(tmp_path / 'out'), '--weights', str(tiny_weights), '--tile', '0']
    assert restore_cli.main([*args[:2], str(tmp_path / 'reference'), *args[3:]]) == 0
    capsys.readouterr()

    with monkeypatch.context() as patch:
        full_disk_for(patch, 'b_x2.png')
        assert restore_cli.main(args) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if 'error:' in line]
    assert errors == [f'mambair-restore: error: cannot write b_x2.png: No space left on device ({crops / "b.png"})']
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a_x2.png', 'c_x2.png']  # no partial, no temp
    assert '2 restored, 0 skipped, 1 failed' in captured.out

    assert restore_cli.main(args) == 0  # the rerun redoes what failed, skips the rest
    assert '1 restored, 2 skipped, 0 failed' in capsys.readouterr().out
    for name in ('a_x2.png', 'b_x2.png', 'c_x2.png'):
        assert (tmp_path / 'out' / name).read_bytes() == (tmp_path / 'reference' / name).read_bytes()


def test_truncated_result_of_an_older_version_is_redone(tmp_path: Path, crops: Path, tiny_weights: Path,
                                                        capsys) -> None:
    """A truncated PNG under the final name (what a full disk left before atomic writes) is not 'exists'."""
    out = tmp_path / 'out'
    assert restore_cli.main([str(crops / 'a.png'), '-o', str(out), '--weights', str(tiny_weights)]) == 0
    good = (out / 'a_x2.png').read_bytes()
    (out / 'a_x2.png').write_bytes(good[:len(good) - 144])
    assert restore_cli.main([str(crops / 'a.png'), '-o', str(out), '--weights', str(tiny_weights)]) == 0
    assert 'redoing a_x2.png: the existing file does not decode' in capsys.readouterr().err
    assert (out / 'a_x2.png').read_bytes() == good


def test_checkpoint_and_data_tool_on_a_full_disk(tmp_path: Path, crops: Path, monkeypatch, capsys) -> None:
    path = tmp_path / 'net_g_10.pth'
    save_atomic({'params': {'w': torch.ones(3)}}, path)
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        full_disk_for(patch, 'net_g_10.pth')
        with pytest.raises(OSError) as info:
            save_atomic({'params': {'w': torch.zeros(1000)}}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before and not hidden_files(tmp_path)

    out = tmp_path / 'lr'
    with monkeypatch.context() as patch:
        full_disk_for(patch, 'bx2.png')
        assert make_lr.main([str(crops), str(out), '-s', '2', '-j', '1']) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith('mambair-make-lr: error: No space left on device: ') and 'bx2.png' in line, line
    assert not out.exists(), 'a failed run leaves nothing behind'
    assert not hidden_files(tmp_path)
    assert make_lr.main([str(crops), str(out), '-s', '2', '-j', '1']) == 0
    assert sorted(p.name for p in (out / 'X2').iterdir()) == ['ax2.png', 'bx2.png', 'cx2.png']


# ------------------------------------------------------------------------------------------ a real full tmpfs


@pytest.fixture(scope='module')
def in_namespace():
    return mount_namespace()


def test_restore_on_a_real_full_tmpfs(tmp_path: Path, crops: Path, tiny_weights: Path, in_namespace) -> None:
    """mambair-restore into a 12 KB tmpfs (the issue's reproduction): no truncated or empty PNG is left, each
    failure is one line, and the rerun after the disk was enlarged completes the rest."""
    mnt = tmp_path / 'mnt'
    mnt.mkdir()
    restore = shell_words([*cli_command('mambair-restore'), str(crops), '-o', f'{mnt}/out', '--weights',
                      str(tiny_weights), '--tile', '0'])
    script = textwrap.dedent(f'''\
        mount -t tmpfs -o size=12k tmpfs {mnt} || exit 99
        {restore} > run1.out 2> run1.err; echo $? > run1.rc
        cp -a {mnt}/out after1
        mount -o remount,size=1m {mnt} || exit 98
        {restore} > run2.out 2> run2.err; echo $? > run2.rc
        cp -a {mnt}/out after2
        ''')
    proc = in_namespace(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    err1 = (tmp_path / 'run1.err').read_text()
    assert (tmp_path / 'run1.rc').read_text().strip() == '1', err1
    failures = [line for line in err1.splitlines() if 'error:' in line]
    assert failures and all('No space left on device' in line for line in failures), err1
    assert 'Traceback' not in err1
    kept = sorted(p.name for p in (tmp_path / 'after1').iterdir())
    assert len(kept) == 3 - len(failures) and not [n for n in kept if n.startswith('.')], kept
    for name in kept:  # what is there is complete
        assert cv2.imread(str(tmp_path / 'after1' / name)).shape == (48, 48, 3)
    assert (tmp_path / 'run2.rc').read_text().strip() == '0', (tmp_path / 'run2.err').read_text()
    assert f'{len(failures)} restored, {len(kept)} skipped, 0 failed' in (tmp_path / 'run2.out').read_text()
    assert sorted(p.name for p in (tmp_path / 'after2').iterdir()) == ['a_x2.png', 'b_x2.png', 'c_x2.png']
    for name in ('a_x2.png', 'b_x2.png', 'c_x2.png'):
        assert cv2.imread(str(tmp_path / 'after2' / name)).shape == (48, 48, 3)


def test_training_on_a_real_full_tmpfs_stops_cleanly_and_resumes(tmp_path: Path, in_namespace) -> None:
    """Training whose disk fills up at the third checkpoint: one error line (no chained traceback), the complete
    checkpoints stay, and ``--auto_resume`` on a larger disk continues from the last complete one."""
    hr, lr = make_sr_pairs(tmp_path / 'data', per_photo=1)
    opt = write_options(tmp_path / 'train.yml', sr_train_options('full', hr, lr, dict(type='MambaIR', **TINY_MAMBAIR),
                                                                 total_iter=30, save_freq=5, val_freq=1000))
    mnt = tmp_path / 'mnt'
    mnt.mkdir()
    train = shell_words([*cli_command('mambair-train'), '-opt', str(opt)])
    # ~124 KB per network and ~250 KB per training state: two checkpoints fit, the third does not
    script = textwrap.dedent(f'''\
        mount -t tmpfs -o size=900k tmpfs {mnt} || exit 99
        cd {mnt}
        {train} > {tmp_path}/run1.out 2> {tmp_path}/run1.err; echo $? > {tmp_path}/run1.rc
        cp -a {mnt}/experiments {tmp_path}/after1
        mount -o remount,size=64m {mnt} || exit 98
        {train} --auto_resume > {tmp_path}/run2.out 2> {tmp_path}/run2.err; echo $? > {tmp_path}/run2.rc
        cp -a {mnt}/experiments {tmp_path}/after2
        ''')
    proc = in_namespace(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    err1 = (tmp_path / 'run1.err').read_text()
    assert (tmp_path / 'run1.rc').read_text().strip() == '1', err1
    assert 'Traceback' not in err1 and 'Logging error' not in err1, err1
    ours = [line for line in err1.splitlines() if line.startswith('mambair-train: ')]
    assert ours[-1].startswith('mambair-train: error: cannot write ') and 'No space left on device' in ours[-1]
    assert 'last complete checkpoint stays the resume point' in ours[-1] and len(ours) <= 2, err1
    exp = tmp_path / 'after1' / 'full'
    states = sorted(int(p.stem) for p in (exp / 'training_states').glob('*.state'))
    assert states and states[-1] < 30 and not hidden_files(exp)
    for path in [*(exp / 'training_states').iterdir(), *(exp / 'models').iterdir()]:
        torch.load(path, weights_only=True)  # every file left is complete

    assert (tmp_path / 'run2.rc').read_text().strip() == '0', (tmp_path / 'run2.err').read_text()
    log = sorted((tmp_path / 'after2' / 'full').glob('train_full_*.log'))[-1].read_text()
    assert 'Resuming training from epoch' in log and f'iter: {states[-1]}.' in log and 'End of training' in log
    assert (tmp_path / 'after2' / 'full' / 'models' / 'net_g_30.pth').is_file()


class _FullStream:
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        pass


def test_log_file_on_a_full_disk_is_one_line(tmp_path: Path, capsys) -> None:
    """BasicSR's log file handler printed a 'Logging error' traceback for every line once the disk was full."""
    logger = compat.get_root_logger('mambair_full_disk_test', log_file=str(tmp_path / 'run.log'))
    handler = next(h for h in logger.handlers if isinstance(h, logging.FileHandler))
    handler.stream = _FullStream()
    for k in range(3):
        logger.info(f'line {k}')
    err = capsys.readouterr().err
    assert 'Logging error' not in err and 'Traceback' not in err, err
    assert err.count(f'cannot write the log file {tmp_path / "run.log"}: No space left on device') == 1, err
    assert 'line 2' in err and handler not in logger.handlers  # the console still gets every line
