"""``python -m basicsr.train`` / ``python -m basicsr.test`` (issue 15): the ``.pth`` file our wheel installs makes
them run ``basicsr_mambair.train`` / ``.test``, except for a ``basicsr`` of the current directory or with
``MAMBAIR_STOCK_BASICSR=1``. Checked in a fresh environment built from the wheel (the release path) and in this
one (``make test``'s editable install)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, free_port
from tiny_experiments import TINY_NETWORK, make_sr_pairs, sr_test_options, sr_train_options, write_options

from _basicsr_mambair_redirect import OPT_OUT, module_of

NOTE = 'python -m basicsr.train: running basicsr_mambair.train'


@pytest.mark.parametrize('argv, module', [
    (['python', '-m', 'basicsr.train', '-opt', 'x.yml'], 'basicsr.train'),
    (['python', '-u', '-m', 'basicsr.test'], 'basicsr.test'),
    (['python', '-um', 'basicsr.train'], 'basicsr.train'),
    (['python', '-mbasicsr.train', '--auto_resume'], 'basicsr.train'),
    (['python', '-X', 'dev', '-W', 'ignore', '-m', 'basicsr.train'], 'basicsr.train'),
    (['python', '-Xdev', '--check-hash-based-pycs', 'never', '-m', 'basicsr.train'], 'basicsr.train'),
    (['python', 'train.py', '-m', 'basicsr.train'], None),  # a script's own arguments
    (['python', '-c', 'pass', '-m', 'basicsr.train'], None),
    (['python', '-W', '-m', 'basicsr.train'], None),  # "-m" is -W's value; then a script
    (['python', '-m'], None),
])
def test_the_module_is_read_from_the_interpreter_command_line(argv, module):
    assert module_of(argv) == module


def _env(**extra: str) -> dict[str, str]:
    # not helpers.cli_env: that puts this checkout on PYTHONPATH, and the wheel's copy must be the one imported
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', OPT_OUT)}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', **extra)
    return env


def _run(python: str, *args: str, cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([python, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope='module')
def wheel_python(tmp_path_factory) -> tuple[str, Path]:
    """A fresh environment with our wheel installed (its dependencies reached through a path entry to this
    environment's site-packages, whose .pth files it does not run): its python and its site-packages."""
    tmp = tmp_path_factory.mktemp('wheel')
    junk = {'.git', '.venv', 'build', 'dist', '__pycache__', 'experiments', 'results', 'tb_logger', 'datasets',
            'demo', '.gpu_check', '.pytest_cache', '.ruff_cache'}
    src = shutil.copytree(REPO, tmp / 'src', ignore=lambda _, names: [
        n for n in names if n in junk or n.endswith('.egg-info')])
    _run(sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '--no-index', '-w',
         str(tmp / 'dist'), str(src), cwd=tmp)
    wheel = next((tmp / 'dist').glob('basicsr_mambair-*.whl'))
    root = {n for n in zipfile.ZipFile(wheel).namelist() if '/' not in n}
    assert root == {'_basicsr_mambair_redirect.py', 'basicsr_mambair_redirect.pth'}

    _run(sys.executable, '-m', 'venv', '--without-pip', str(tmp / 'env'), cwd=tmp)
    python = str(tmp / 'env' / 'bin' / 'python')
    purelib = Path(_run(python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))', cwd=tmp)
                   .stdout.strip())
    _run(sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', '--target', str(purelib),
         str(wheel), cwd=tmp)
    (purelib / 'zz_dependencies.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    return python, purelib


@pytest.mark.slow
def test_python_m_basicsr_train_and_test_run_ours_from_the_wheel(wheel_python, tmp_path):
    python, purelib = wheel_python
    where = _run(python, '-c', 'import basicsr_mambair, _basicsr_mambair_redirect as r; '
                 'print(basicsr_mambair.__file__); print(r.__file__)', cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(purelib) for p in where)  # the wheel's copies, not the checkout

    hr_dir, lr_dir = make_sr_pairs(tmp_path / 'data', size=48, per_photo=1)
    yml = write_options(tmp_path / 'train.yml', sr_train_options('tiny', hr_dir, lr_dir, TINY_NETWORK, total_iter=2,
                                                                 save_freq=2, val_freq=2, gt_size=32))
    run = tmp_path / 'run'
    run.mkdir()
    proc = _run(python, '-m', 'basicsr.train', '-opt', str(yml), cwd=run)
    assert proc.stderr.count(NOTE) == 1
    weights = run / 'experiments' / 'tiny' / 'models' / 'net_g_2.pth'
    assert weights.is_file()  # in the current directory, not in site-packages (stock BasicSR's root)
    assert not (purelib / 'experiments').exists()
    # CPU resume (stock BasicSR maps the state onto CUDA) with a longer schedule
    _run(python, '-m', 'basicsr.train', '-opt', str(yml), '--auto_resume', '--force_yml', 'train:total_iter=4', cwd=run)
    assert (run / 'experiments' / 'tiny' / 'models' / 'net_g_4.pth').is_file()
    # torchrun starts its workers as `python -u -m basicsr.train`: gloo on the CPU, one note (rank 0)
    proc = _run(python, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}', '-m',
                'basicsr.train', '-opt', str(yml), '--launcher', 'pytorch', '--force_yml', 'name=ddp', cwd=run)
    assert (proc.stdout + proc.stderr).count(NOTE) == 1
    log = next((run / 'experiments' / 'ddp').glob('train_*.log')).read_text()
    assert 'World size (gpu number): 2' in log and 'End of training' in log

    test_yml = write_options(tmp_path / 'test.yml', sr_test_options('tiny_test', hr_dir, lr_dir, TINY_NETWORK, weights))
    proc = _run(python, '-m', 'basicsr.test', '-opt', str(test_yml), cwd=run)
    assert 'running basicsr_mambair.test' in proc.stderr
    assert len(list((run / 'results' / 'tiny_test' / 'visualization' / 'pairs').glob('*.png'))) == 4
    assert 'psnr' in proc.stdout + proc.stderr


def test_a_basicsr_of_the_current_directory_and_the_opt_out_run_as_they_are(wheel_python, tmp_path):
    python, _ = wheel_python
    official = tmp_path / 'MambaIR'  # a clone of the official repository has its own basicsr/
    (official / 'basicsr').mkdir(parents=True)
    (official / 'basicsr' / '__init__.py').write_text('')
    (official / 'basicsr' / 'train.py').write_text('print("the clone\'s basicsr.train")\n')
    proc = _run(python, '-m', 'basicsr.train', '-opt', 'x.yml', cwd=official)
    assert proc.stdout == "the clone's basicsr.train\n" and NOTE not in proc.stderr

    proc = _run(python, '-m', 'basicsr.train', '--help', cwd=tmp_path, check=False, **{OPT_OUT: '1'})
    assert 'mambair-train' not in proc.stdout + proc.stderr and NOTE not in proc.stderr


def test_this_environment_runs_ours_too(tmp_path):
    """``make test`` installs the checkout editable: the .pth comes with that install too."""
    proc = _run(sys.executable, '-m', 'basicsr.train', '--help', cwd=tmp_path)
    assert proc.stdout.startswith('usage: mambair-train') and proc.stderr.count(NOTE) == 1
