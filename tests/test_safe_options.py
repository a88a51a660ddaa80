"""Option files and ``--force_yml`` never run code; BasicSR's value types survive; a run that fails before doing
any work leaves nothing behind (issue 16, items 2 and 6)."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import TINY_MAMBAIR, run_cli, tiny_checkpoint
from tiny_experiments import make_sr_pairs, sr_train_options, write_options

from basicsr_mambair import compat
from basicsr_mambair.errors import OptionError
from basicsr_mambair.options import apply_overrides, read_option_file

TINY_NETWORK = dict(type='MambaIR', **TINY_MAMBAIR)
TAG = '!!python/object/apply:os.system'


@pytest.fixture(scope='module')
def sr_data(tmp_path_factory):
    return make_sr_pairs(tmp_path_factory.mktemp('sr_data'), per_photo=1)


def error_lines(proc, prog: str) -> list[str]:
    """stderr's lines, checked to end with one ``<prog>: error:`` line and to hold no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith(f'{prog}: error: '), proc.stderr
    return lines


def test_yaml_tags_never_run_in_any_command(tmp_path: Path, sr_data) -> None:
    """``pwn: !!python/object/apply:os.system [...]`` in an option file: refused in one line naming the file by
    mambair-train, mambair-test and mambair-restore --opt; the command never runs; nothing is created."""
    hr, lr = sr_data
    marker = tmp_path / 'PWNED'
    evil = write_options(tmp_path / 'evil.yml', sr_train_options('evil', hr, lr, TINY_NETWORK))
    evil.write_text(evil.read_text() + f'pwn: {TAG} ["touch {marker}"]\n')
    weights = tiny_checkpoint(tmp_path / 'net.pth')
    image = next(lr.iterdir())
    runs = {'mambair-train': ['-opt', str(evil)], 'mambair-test': ['-opt', str(evil)],
            'mambair-restore': [str(image), '-o', str(tmp_path / 'out'), '--weights', str(weights), '--opt', str(evil)]}
    for prog, args in runs.items():
        proc = run_cli(prog, *args, cwd=tmp_path, check=False)
        assert not marker.exists(), f'{prog} ran the YAML tag'
        lines = error_lines(proc, prog)
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert str(evil) in lines[0] and f'refusing the YAML tag {TAG}' in lines[0], lines[0]
    # the same tag in a --force_yml value
    proc = run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'ok.yml', sr_train_options(
        'ok', hr, lr, TINY_NETWORK))), '--force_yml', f'name={TAG} ["touch {marker}"]', cwd=tmp_path, check=False)
    assert not marker.exists() and proc.returncode == 2
    assert len(error_lines(proc, 'mambair-train')) == 1 and f'refusing the YAML tag {TAG}' in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['evil.yml', 'net.pth', 'ok.yml']

    # BasicSR's own parse_options (what its train/test pipelines call) is replaced by the safe one
    compat.patch_basicsr()
    import basicsr.train
    import basicsr.utils.options

    assert basicsr.train.parse_options is compat.parse_options is basicsr.utils.options.parse_options
    old_argv = sys.argv
    sys.argv = ['mambair-train', '-opt', str(evil)]
    try:
        with pytest.raises(OptionError, match='refusing the YAML tag'):
            compat.parse_options(str(tmp_path), is_train=True)
    finally:
        sys.argv = old_argv
    assert not marker.exists()


def test_force_yml_values_are_never_evaluated(tmp_path: Path, sr_data) -> None:
    """BasicSR ``eval``s values starting with ``[``: here they are YAML lists (of text), the command is not
    run, and the failing run leaves no results folder behind."""
    hr, lr = sr_data
    marker = tmp_path / 'X'
    opt = sr_train_options('forced', hr, lr, TINY_NETWORK)
    opt = {k: v for k, v in opt.items() if k != 'train'}
    opt['datasets'] = {'test_1': opt['datasets']['val']}
    payload = f"[__import__('os').system('touch {marker}')]"
    opt_file = write_options(tmp_path / 'test.yml', opt)
    assert apply_overrides(read_option_file(str(opt_file)), [f'network_g:depths={payload}'])['network_g'][
        'depths'] == [f"__import__('os').system('touch {marker}')"]
    proc = run_cli('mambair-test', '-opt', str(opt_file), '--force_yml', f'network_g:depths={payload}',
                   cwd=tmp_path, check=False)
    assert not marker.exists(), 'a --force_yml value was evaluated'
    line = error_lines(proc, 'mambair-test')[-1]
    assert proc.returncode == 1, proc.stderr
    # nothing was done: no results/forced (nor results/); the traceback is kept outside the results tree
    assert sorted(p.name for p in tmp_path.iterdir()) == ['test.yml']
    log = Path(line.split('(traceback in ')[1].rstrip(')'))
    assert 'Traceback' in log.read_text() and not log.is_relative_to(tmp_path)
    log.unlink()


def test_basicsr_types_and_key_order_survive(tmp_path: Path, sr_data, monkeypatch) -> None:
    """Numbers (``1e-3`` too, as BasicSR users write it), ``!!float``, lists, ``~``, booleans and key order, in the
    file and in ``--force_yml``; dates stay text (experiment names)."""
    path = tmp_path / 'types.yml'
    path.write_text(textwrap.dedent('''\
        zeta: 1
        lr: 1e-3
        lr2: !!float 2e-4
        lr3: 2.0e-4
        big: -5E+2
        nothing: ~
        flag: true
        betas: [0.9, 0.99]
        milestones: [250000, 4e5]
        nested: {b: 1, a: 2}
        day: 2024-05-01
        '''))
    opt = read_option_file(str(path))
    assert list(opt) == ['zeta', 'lr', 'lr2', 'lr3', 'big', 'nothing', 'flag', 'betas', 'milestones', 'nested', 'day']
    assert opt == {'zeta': 1, 'lr': 1e-3, 'lr2': 2e-4, 'lr3': 2e-4, 'big': -500.0, 'nothing': None, 'flag': True,
                   'betas': [0.9, 0.99], 'milestones': [250000, 4e5], 'nested': {'b': 1, 'a': 2}, 'day': '2024-05-01'}
    assert isinstance(opt['lr'], float) and list(opt['nested']) == ['b', 'a']

    # through the options BasicSR's pipelines get: --force_yml train:optim_g:lr=1e-3 is a float, -1 an int
    hr, lr = sr_data
    opt_file = write_options(tmp_path / 'train.yml', sr_train_options('types', hr, lr, TINY_NETWORK))
    forced = ['train:optim_g:lr=1e-3', 'train:warmup_iter=-1', 'path:strict_load_g=false', 'val:save_img=True',
              'train:scheduler:milestones=[10, 2e1]', 'logger:use_tb_logger=~', 'name=2024-05-01']
    monkeypatch.setattr(sys, 'argv', ['mambair-train', '-opt', str(opt_file), '--force_yml', *forced])
    parsed, _ = compat.parse_options(str(tmp_path), is_train=True)
    assert parsed['train']['optim_g']['lr'] == 1e-3 and isinstance(parsed['train']['optim_g']['lr'], float)
    assert parsed['train']['warmup_iter'] == -1 and parsed['path']['strict_load_g'] is False
    assert parsed['val']['save_img'] is True and parsed['train']['scheduler']['milestones'] == [10, 20.0]
    assert parsed['logger']['use_tb_logger'] is None and parsed['name'] == '2024-05-01'
    assert parsed['path']['experiments_root'] == str(tmp_path / 'experiments' / '2024-05-01')
    assert list(parsed)[:4] == ['name', 'model_type', 'scale', 'num_gpu']
    assert not (tmp_path / 'experiments').exists()


def test_failed_run_leaves_nothing_and_restores_the_archived_folder(tmp_path: Path, sr_data) -> None:
    """BasicSR renames an existing experiment to ``<name>_archived_<time>`` before a run; a run that then fails
    before any work removes what it created and puts the old experiment back."""
    hr, lr = sr_data
    old = tmp_path / 'experiments' / 'again' / 'models'
    old.mkdir(parents=True)
    (old / 'net_g_5.pth').write_bytes(b'earlier work')
    opt = sr_train_options('again', hr, lr, dict(type='MSRResNet', upscale=2, no_such_arg=1))
    proc = run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'bad.yml', opt)), cwd=tmp_path, check=False)
    line = error_lines(proc, 'mambair-train')[-1]
    assert proc.returncode == 1 and 'no_such_arg' in line and 'traceback in' in line
    assert sorted(p.name for p in (tmp_path / 'experiments').iterdir()) == ['again']
    assert (old / 'net_g_5.pth').read_bytes() == b'earlier work'
    assert sorted(p.name for p in (tmp_path / 'experiments' / 'again').rglob('*')) == ['models', 'net_g_5.pth']
    assert not (tmp_path / 'tb_logger').exists()
    Path(line.split('(traceback in ')[1].rstrip(')')).unlink()
    shutil.rmtree(tmp_path / 'experiments')
