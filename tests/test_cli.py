"""The plugin as a user meets it: registration, imports, and real runs of mambair-train/-test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, cli_command, cli_env, free_port, run_cli
from tiny_experiments import TINY_NETWORK, make_sr_pairs, sr_train_options, write_options

EXPECTED_REGISTERED = {
    'arch': {'MambaIR', 'MambaIRUNet', 'Bicubic', 'MambaIRv2', 'MambaIRv2Light'},
    'model': {'MambaIRModel', 'RealDenoisingModel', 'MambaIRv2Model', 'MambaIRv2LightModel'},
}


@pytest.fixture(scope='module')
def sr_data(tmp_path_factory):
    return make_sr_pairs(tmp_path_factory.mktemp('sr_data'))


def test_every_registered_name_resolves():
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

    registries = {'arch': ARCH_REGISTRY, 'dataset': DATASET_REGISTRY, 'model': MODEL_REGISTRY}
    for kind, registry in registries.items():
        ours = {name for name, obj in registry._obj_map.items() if obj.__module__.startswith('basicsr_mambair.')}
        assert EXPECTED_REGISTERED.get(kind, set()) <= ours, kind
        for name in ours:
            assert registry.get(name).__name__ == name


def _imported_modules(statement: str, block_mamba: bool = True) -> set[str]:
    blocker = (
        'import importlib.abc, sys\n'
        'class Block(importlib.abc.MetaPathFinder):\n'
        '    def find_spec(self, name, path, target=None):\n'
        "        if name.split('.')[0] in ('mamba_ssm', 'causal_conv1d'):\n"
        "            raise ImportError('blocked for the test: ' + name)\n"
        'sys.meta_path.insert(0, Block())\n'
    ) if block_mamba else ''
    code = f'{blocker}{statement}\nimport sys\nprint("\\n".join(sorted(sys.modules)))'
    out = subprocess.run([sys.executable, '-c', code], env=cli_env(), capture_output=True, text=True, check=True,
                         cwd=REPO)
    return set(out.stdout.split())


def test_import_adds_no_heavy_or_optional_dependency():
    """`import basicsr_mambair` loads BasicSR and its own modules, nothing else (mamba_ssm absent)."""
    with_basicsr = _imported_modules('from basicsr_mambair.compat import alias_functional_tensor\n'
                                     'alias_functional_tensor()\nimport basicsr')
    with_plugin = _imported_modules('import basicsr_mambair')
    extra = {m for m in with_plugin - with_basicsr if not m.startswith('basicsr_mambair')}
    assert not extra, f'import basicsr_mambair imports more than basicsr does: {sorted(extra)}'
    assert not {m for m in with_plugin if m.split('.')[0] in ('mamba_ssm', 'causal_conv1d')}


def test_import_time_not_above_basicsr():
    def best_of(statement: str, n: int = 2) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            subprocess.run([sys.executable, '-c', statement], env=cli_env(), check=True, cwd=REPO)
            times.append(time.perf_counter() - start)
        return min(times)

    t_basicsr = best_of('from basicsr_mambair.compat import alias_functional_tensor\n'
                        'alias_functional_tensor()\nimport basicsr')
    t_plugin = best_of('import basicsr_mambair')
    # generous margin: shared, noisy cores; a heavy extra import (e.g. mamba_ssm, triton) costs seconds
    assert t_plugin <= 1.25 * t_basicsr + 0.5, (t_plugin, t_basicsr)


def test_help_describes_the_command(tmp_path):
    out = run_cli('mambair-train', '--help', cwd=tmp_path).stdout
    for flag in ('-opt', '--launcher', '--auto_resume', '--debug', '--force_yml'):
        assert flag in out
    assert 'experiments/<name>' in out


def _error_line(proc: subprocess.CompletedProcess, only_line: bool = True, prog: str = 'mambair-train') -> str:
    """The error line: the last line on stderr (the only one for errors found before the run starts)."""
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f'{prog}: error: '), proc.stderr
    if only_line:
        assert len(lines) == 1, proc.stderr
    return lines[-1]


def test_bad_inputs_give_one_clear_line(tmp_path, sr_data):
    hr, lr = sr_data
    line = _error_line(run_cli('mambair-train', '-opt', 'missing.yml', cwd=tmp_path, check=False))
    assert 'option file not found: missing.yml' in line

    opt = sr_train_options('bad_arch', hr, lr, dict(TINY_NETWORK, type='NoSuchNet'))
    line = _error_line(run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'a.yml', opt)),
                               cwd=tmp_path, check=False))
    assert "unknown arch type 'NoSuchNet' in network_g" in line

    opt = sr_train_options('bad_root', hr, tmp_path / 'no_such_lr', TINY_NETWORK)
    line = _error_line(run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'b.yml', opt)),
                               cwd=tmp_path, check=False))
    assert 'datasets:train:dataroot_lq not found' in line and 'no_such_lr' in line
    assert not (tmp_path / 'experiments').exists(), 'nothing may be created for a rejected option file'

    # MambaIR ignores unknown keys as the official one does; a stock BasicSR arch does not
    opt = sr_train_options('bad_net_arg', hr, lr, dict(type='MSRResNet', upscale=2, no_such_arg=1))
    line = _error_line(run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'c.yml', opt)),
                               cwd=tmp_path, check=False), only_line=False)
    assert 'no_such_arg' in line and 'traceback in' in line


def test_training_run_writes_everything_under_cwd(tmp_path, sr_data):
    hr, lr = sr_data
    opt_file = write_options(tmp_path / 'train.yml', sr_train_options('tiny', hr, lr, TINY_NETWORK, total_iter=20))
    run_cli('mambair-train', '-opt', str(opt_file), cwd=tmp_path)

    exp = tmp_path / 'experiments' / 'tiny'
    assert (exp / 'models' / 'net_g_20.pth').is_file() and (exp / 'models' / 'net_g_latest.pth').is_file()
    assert (exp / 'training_states' / '20.state').is_file()
    log = next(exp.glob('train_tiny_*.log')).read_text()
    assert 'End of training' in log and '# psnr:' in log
    assert list((tmp_path / 'tb_logger' / 'tiny').glob('events.out.tfevents.*'))
    state = torch.load(exp / 'models' / 'net_g_20.pth', weights_only=True)
    assert set(state) == {'params'} and 'conv_first.weight' in state['params']

    # the trained checkpoint through the test pipeline: results go to ./results/<name>
    test_opt = {k: v for k, v in sr_train_options('tiny_test', hr, lr, TINY_NETWORK).items() if k != 'train'}
    test_opt['datasets'] = {'test_1': test_opt['datasets']['val']}
    test_opt['path'] = dict(pretrain_network_g='experiments/pretrained_models/not_downloaded.pth', strict_load_g=True)
    test_opt['val'] = dict(test_opt['val'], save_img=True, suffix=None)
    test_yml = write_options(tmp_path / 'test.yml', test_opt)
    line = _error_line(run_cli('mambair-test', '-opt', str(test_yml), cwd=tmp_path, check=False), prog='mambair-test')
    assert 'path:pretrain_network_g not found: experiments/pretrained_models/not_downloaded.pth' in line
    line = _error_line(run_cli('mambair-test', '-opt', str(test_yml), '--force_yml', 'path:no_such_key=1',
                               cwd=tmp_path, check=False), prog='mambair-test')
    assert "no option 'no_such_key' to update" in line
    # any checkpoint through a test option file: --force_yml path:pretrain_network_g=...
    run_cli('mambair-test', '-opt', str(test_yml), '--force_yml',
            f"path:pretrain_network_g={exp / 'models' / 'net_g_latest.pth'}", cwd=tmp_path)
    assert len(list((tmp_path / 'results' / 'tiny_test' / 'visualization' / 'val').glob('*.png'))) == 8


def test_resume_after_sigkill(tmp_path, sr_data):
    hr, lr = sr_data
    opt = sr_train_options('resumed', hr, lr, TINY_NETWORK, total_iter=400, save_freq=10, val_freq=1000)
    opt_file = write_options(tmp_path / 'train.yml', opt)
    states = tmp_path / 'experiments' / 'resumed' / 'training_states'
    proc = subprocess.Popen([*cli_command('mambair-train'), '-opt', str(opt_file)], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(states.glob('*.state')) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, 'training ended before it could be killed'
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = sorted(int(p.stem) for p in states.glob('*.state'))
    assert saved and saved[-1] < 400
    # a newer but truncated state (e.g. from a disk filling up) is skipped in favour of the last good one
    (states / f'{saved[-1] + 5}.state').write_bytes(b'PK\x03\x04 truncated')

    proc = run_cli('mambair-train', '-opt', str(opt_file), '--auto_resume', cwd=tmp_path)
    assert f'Skipping unreadable training state {states / f"{saved[-1] + 5}.state"}' in proc.stderr
    log = sorted((tmp_path / 'experiments' / 'resumed').glob('train_resumed_*.log'))[-1].read_text()
    resumed_from = [int(line.split('iter: ')[1].split('.')[0]) for line in log.splitlines()
                    if 'Resuming training from epoch' in line]
    assert resumed_from == [saved[-1]]
    assert 'End of training' in log
    assert (tmp_path / 'experiments' / 'resumed' / 'models' / 'net_g_400.pth').is_file()

    # resuming a finished experiment changes nothing
    latest = tmp_path / 'experiments' / 'resumed' / 'models' / 'net_g_latest.pth'
    before = latest.stat().st_mtime_ns
    proc = run_cli('mambair-train', '-opt', str(opt_file), '--auto_resume', cwd=tmp_path)
    assert 'already finished' in proc.stderr
    assert latest.stat().st_mtime_ns == before


def test_ddp_on_cpu_with_torchrun(tmp_path, sr_data):
    hr, lr = sr_data
    opt_file = write_options(tmp_path / 'train.yml',
                             sr_train_options('ddp', hr, lr, TINY_NETWORK, total_iter=6, save_freq=6, val_freq=6))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           str(REPO / 'basicsr_mambair' / 'train.py'), '-opt', str(opt_file), '--launcher', 'pytorch']
    # on the CPU (gloo) also where a GPU is present: two processes cannot share one GPU under nccl
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(CUDA_VISIBLE_DEVICES=''), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exp = tmp_path / 'experiments' / 'ddp'
    log = next(exp.glob('train_ddp_*.log')).read_text()
    assert 'World size (gpu number): 2' in log and 'End of training' in log
    assert sorted(p.name for p in (exp / 'models').iterdir()) == ['net_g_6.pth', 'net_g_latest.pth']
    assert sorted(p.name for p in (exp / 'training_states').iterdir()) == ['6.state']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('experiments_') or '_archived_' in p.name]
    assert os.listdir(tmp_path / 'experiments') == ['ddp']


def test_non_finite_loss_stops_with_clear_error(tmp_path, sr_data):
    hr, lr = sr_data
    opt = sr_train_options('diverges', hr, lr, TINY_NETWORK, total_iter=30, save_freq=5, val_freq=1000)
    opt['train']['optim_g'] = dict(type='SGD', lr=1e30)  # any torch.optim optimizer is accepted
    proc = run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'nan.yml', opt)), cwd=tmp_path, check=False)
    line = _error_line(proc, only_line=False)
    assert 'non-finite loss' in line and 'at iteration' in line, line
    assert not (tmp_path / 'experiments' / 'diverges' / 'models' / 'net_g_latest.pth').exists()
