"""safetensors checkpoints: mambair-convert both ways, and every reader (load_model / mambair-restore,
pretrain_network_g, mambair-profile) taking .safetensors as it takes .pth, errors included."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file

import basicsr_mambair  # noqa: F401  (registers the archs)
from basicsr_mambair.cli import convert as convert_cli
from basicsr_mambair.cli import restore as restore_cli
from basicsr_mambair.errors import CheckpointError
from basicsr_mambair.models.mambair_model import MambaIRModel
from basicsr_mambair.utils.checkpoint import read_state_dict
from basicsr_mambair.utils.safetensors_io import ENTRIES_KEY, load_safetensors, save_safetensors


@pytest.fixture(scope='module')
def light(reference_dir: Path) -> dict:
    """The official light SR x2 reference (905,016 parameters)."""
    return torch.load(reference_dir / 'mambair_lightSR_x2.pt', weights_only=True)


def assert_same_state_dict(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)  # the order too (safetensors sorts its table; the metadata keeps it)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def one_error_line(stderr: str, prog: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: ') and 'Traceback' not in stderr, stderr
    return lines[0]


def test_convert_round_trip_keeps_params_and_params_ema(light: dict, tmp_path: Path) -> None:
    sd = light['state_dict']
    ema = {k: v + 0.5 for k, v in sd.items()}
    ema['layers.0.residual_group.blocks.0.self_attention.Ds'] = ema[
        'layers.0.residual_group.blocks.0.self_attention.Ds'].double()  # a dtype other than float32 survives too
    torch.save({'params': sd, 'params_ema': ema, 'iter': 7}, tmp_path / 'net_g.pth')
    out = run_cli('mambair-convert', 'net_g.pth', cwd=tmp_path)
    assert 'net_g.pth -> net_g.safetensors: params (714 tensors), params_ema (714 tensors), MambaIR; ' \
           'left out (not state dicts): iter' in out.stdout

    st = tmp_path / 'net_g.safetensors'
    assert_same_state_dict(read_state_dict(st), sd)
    assert_same_state_dict(read_state_dict(st, 'params_ema'), ema)
    raw = load_file(st)  # two entries: prefixed names
    assert set(raw) == {f'params/{k}' for k in sd} | {f'params_ema/{k}' for k in sd}

    run_cli('mambair-convert', 'net_g.safetensors', '-o', 'back/net_g.pth', cwd=tmp_path)
    back = torch.load(tmp_path / 'back' / 'net_g.pth', weights_only=True)
    assert list(back) == ['params', 'params_ema']
    assert_same_state_dict(back['params'], sd)
    assert_same_state_dict(back['params_ema'], ema)


def test_one_entry_is_a_plain_state_dict_for_other_tools(light: dict, tmp_path: Path) -> None:
    """Released checkpoints hold only params: their .safetensors is what spandrel / chaiNNer / load_file read."""
    torch.save({'params': light['state_dict']}, tmp_path / 'light.pth')
    assert convert_cli.main([str(tmp_path / 'light.pth')]) == 0
    raw = load_file(tmp_path / 'light.safetensors')
    assert set(raw) == set(light['state_dict'])
    from basicsr.utils.registry import ARCH_REGISTRY

    net = ARCH_REGISTRY.get('MambaIR')(**light['kwargs'])
    net.load_state_dict(raw, strict=True)
    assert not list(tmp_path.glob('.*tmp*'))  # atomic write: no temporary file left
    # --param-key: one chosen entry; a missing one is one line, and nothing is written
    torch.save({'params': light['state_dict'], 'params_ema': light['state_dict']}, tmp_path / 'both.pth')
    assert convert_cli.main([str(tmp_path / 'both.pth'), '--param-key', 'params_ema', '-o',
                             str(tmp_path / 'ema.safetensors')]) == 0
    assert list(load_safetensors(tmp_path / 'ema.safetensors')) == ['params_ema']
    assert set(load_file(tmp_path / 'ema.safetensors')) == set(light['state_dict'])


def test_convert_never_overwrites_without_overwrite(tmp_path: Path, capsys) -> None:
    sd = {'w': torch.arange(6.0).view(2, 3)}
    torch.save(sd, tmp_path / 'a.pth')
    (tmp_path / 'a.safetensors').write_bytes(b'mine')
    assert convert_cli.main([str(tmp_path / 'a.pth')]) == 0
    assert 'skipped: ' in capsys.readouterr().err and (tmp_path / 'a.safetensors').read_bytes() == b'mine'
    assert convert_cli.main([str(tmp_path / 'a.pth'), '--overwrite']) == 0
    assert torch.equal(read_state_dict(tmp_path / 'a.safetensors')['w'], sd['w'])  # a bare dict is 'params'
    assert 'not a MambaIR-family network' in capsys.readouterr().out
    # one bad input among good ones: 1; only bad inputs: 2; each a single line
    assert convert_cli.main([str(tmp_path / 'missing.pth'), str(tmp_path / 'a.pth'), '--overwrite']) == 1
    assert 'checkpoint not found: ' in one_error_line(capsys.readouterr().err, 'mambair-convert')
    assert convert_cli.main([str(tmp_path / 'a.pth'), '--param-key', 'params_ema', '--overwrite']) == 2
    assert "no state dict under 'params_ema' (entries: params)" in one_error_line(capsys.readouterr().err,
                                                                                   'mambair-convert')
    assert convert_cli.main([str(tmp_path / 'a.pth'), str(tmp_path / 'a.safetensors'), '-o', 'x.pth']) == 2
    assert 'names one file, but there are 2 inputs' in capsys.readouterr().err


def test_restore_from_safetensors_equals_pth(light: dict, shared_data: Path, tmp_path: Path) -> None:
    """mambair-restore (load_model) on a real image: the same PNG from either file."""
    crop = cv2.imread(str(shared_data / 'Set5' / 'HR' / 'bird.png'))[100:124, 60:80]
    cv2.imwrite(str(tmp_path / 'bird.png'), crop)
    torch.save({'params': light['state_dict']}, tmp_path / 'light.pth')
    save_safetensors({'params': light['state_dict']}, tmp_path / 'light.safetensors')
    for name in ('light.pth', 'light.safetensors'):
        assert restore_cli.main([str(tmp_path / 'bird.png'), '-o', str(tmp_path / f'out_{name}'), '--weights',
                                 str(tmp_path / name), '--quiet']) == 0
    pth, st = (cv2.imread(str(tmp_path / f'out_{name}' / 'bird_x2.png'))
               for name in ('light.pth', 'light.safetensors'))
    assert pth.shape == (48, 40, 3) and np.array_equal(pth, st)


def test_wrong_shape_gives_the_same_message_as_a_pth(light: dict, tmp_path: Path, capsys) -> None:
    sd = dict(light['state_dict'])
    key = 'layers.1.residual_group.blocks.2.conv_blk.cab.0.weight'
    sd[key] = torch.zeros(31, 60, 1, 1)  # one tensor of another shape
    torch.save({'params': sd}, tmp_path / 'bad.pth')
    save_safetensors({'params': sd}, tmp_path / 'bad.safetensors')
    lines = {}
    for name in ('bad.pth', 'bad.safetensors'):
        weights = str(tmp_path / name)
        assert restore_cli.main(['x.png', '-o', str(tmp_path), '--weights', weights, '--task', 'lightSR_x2']) == 2
        lines[name] = one_error_line(capsys.readouterr().err, 'mambair-restore').replace(weights, 'WEIGHTS')
    assert lines['bad.pth'] == lines['bad.safetensors']
    assert 'WEIGHTS does not fit the MambaIR network' in lines['bad.pth']
    assert f'{key} (31, 60, 1, 1) in checkpoint vs (30, 60, 1, 1) in network' in lines['bad.pth']

    model = MambaIRModel.__new__(MambaIRModel)  # pretrain_network_g goes through load_network
    from basicsr.utils.registry import ARCH_REGISTRY

    messages = []
    for name in ('bad.pth', 'bad.safetensors'):
        with pytest.raises(CheckpointError) as info:
            model.load_network(ARCH_REGISTRY.get('MambaIR')(**light['kwargs']), str(tmp_path / name))
        messages.append(str(info.value).replace(name, 'FILE'))
    assert messages[0] == messages[1]
    net = ARCH_REGISTRY.get('MambaIR')(**light['kwargs'])
    save_safetensors({'params_ema': light['state_dict']}, tmp_path / 'ema.safetensors')
    model.load_network(net, str(tmp_path / 'ema.safetensors'), param_key='params_ema')
    assert torch.equal(net.state_dict()[key], light['state_dict'][key])


def test_damaged_safetensors_is_one_line(light: dict, tmp_path: Path, capsys) -> None:
    path = tmp_path / 'cut.safetensors'
    save_safetensors({'params': light['state_dict']}, path)
    path.write_bytes(path.read_bytes()[:-1000])  # truncated
    assert restore_cli.main(['x.png', '-o', str(tmp_path), '--weights', str(path)]) == 2
    line = one_error_line(capsys.readouterr().err, 'mambair-restore')
    assert f'cannot read checkpoint {path}: the file is truncated or corrupt, or not a safetensors file' in line
    save_file({'w': torch.zeros(2)}, tmp_path / 'meta.safetensors', metadata={ENTRIES_KEY: '{"params": ["v"]}'})
    with pytest.raises(CheckpointError, match=f'metadata {ENTRIES_KEY} lists tensors the file lacks: v'):
        read_state_dict(tmp_path / 'meta.safetensors')
