"""mambair-profile / basicsr_mambair.profile: parameter counts of the official presets (spec section 5), MACs of a
tiny network against a count by hand, the published MACs of the light models (MambaIRv2 paper)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import arch_class, run_cli

import basicsr_mambair  # noqa: F401  (registers the archs)
from basicsr_mambair.cli import profile as profile_cli
from basicsr_mambair.profile import profile_config, profile_network

# spec section 5: sum(p.numel() for p in model.parameters()) of the official classes
SPEC_PARAMS = {
    'classicSR_x2': 20_421_863, 'classicSR_x3': 20_606_503, 'classicSR_x4': 20_569_575,
    'lightSR_x2': 905_016, 'lightSR_x3': 913_131, 'lightSR_x4': 924_492,
    'colorDN_15': 15_777_507, 'colorDN_25': 15_777_507, 'colorDN_50': 15_777_507,
    'CAR_10': 15_771_025, 'CAR_30': 15_771_025, 'CAR_40': 15_771_025,
    'realDN': 26_779_480,
}
# spec section 6.2, the MambaIRv2 paper's light SR table: MACs (G) for an HR output of 1280 x 720
PAPER_MACS = {'lightSR_x2': 334.2, 'lightSR_x3': 148.5, 'lightSR_x4': 84.6}


def test_parameter_counts_of_the_official_presets(capsys) -> None:
    assert profile_cli.main(['--task', 'all', '--input', '8x8', '--json']) == 0
    results = {r['name']: r for r in json.loads(capsys.readouterr().out)}
    assert {name: results[name]['params'] for name in SPEC_PARAMS} == SPEC_PARAMS
    for result in results.values():  # every preset: the scan counted, sizes right
        assert result['scan'] > 0 and result['total'] == result['without_scan'] + result['scan']
        scale = result['output_shape'][1] // 8
        assert result['input_shape'][1:] == [8, 8] and result['output_shape'][1:] == [8 * scale, 8 * scale]


def test_macs_of_a_tiny_network_equal_a_count_by_hand() -> None:
    c, C, N, s = 3, 32, 2, 2  # image channels, embed_dim, d_state, scale
    d = int(1.5 * C)  # d_inner = int(mlp_ratio * embed_dim)
    R, K = 2, 4  # dt_rank = ceil(C / 16); four scan directions
    H, W = 5, 7
    P = H * W  # LR pixels = scan length L
    Ca = C // 30  # channel-attention width (squeeze factor 30)
    net = arch_class('MambaIR')(in_chans=c, embed_dim=C, depths=[1], d_state=N, mlp_ratio=1.5, upscale=s,
                                upsampler='pixelshuffledirect')
    prof = profile_network(net, (H, W), c)
    assert next(net.parameters()).device.type == 'cpu'  # the network itself was not moved

    conv3 = 9  # a 3x3 kernel
    by_hand = {
        # part: {category: MACs}; a conv: output values * input channels per group * kernel size;
        # a linear / matmul: output values * inner size; LayerNorm: 5 per value; pooling: 1 per input value
        'conv_first': {'conv': P * C * c * conv3},
        'patch_embed': {'norm': 5 * P * C},
        'layers': {
            'norm': 5 * P * C + 5 * P * d + 5 * P * C,  # ln_1, SS2D out_norm, ln_2
            'matmul': (P * 2 * d * C  # in_proj C -> 2d
                       + K * P * (R + 2 * N) * d  # x_proj: per direction d -> R + 2N
                       + K * P * d * R  # dt_projs: per direction R -> d
                       + P * C * d),  # out_proj d -> C
            'conv': (P * d * conv3  # SS2D depthwise conv
                     + P * (C // 2) * C + P * (C // 2) * conv3 + P * C * (C // 2) + P * C * conv3  # light CAB
                     + Ca * C + C * Ca  # channel attention on the pooled 1x1 map
                     + P * C * C * conv3),  # the group's conv (resi_connection 1conv)
            'pool': P * C,
            # the scan over D = K d channels and L = P steps: per step and state dt*A, (dt u)*B, the state's
            # multiply-add and the output's (4); per step dt*u and the skip D*u (2)
            'scan': K * d * P * (4 * N + 2),
        },
        'norm': {'norm': 5 * P * C},
        'conv_after_body': {'conv': P * C * C * conv3},
        'upsample': {'conv': P * (c * s * s) * C * conv3},
    }
    assert prof.parts == list(by_hand)
    assert {part: dict(counts) for part, counts in prof.macs.items()} == by_hand
    assert prof.scan_calls == 1 and prof.scan_exp == {'layers': K * d * P * N}  # one exp per step and state
    assert prof.published() == prof.without_scan() + K * d * P * (9 * N + 1)  # VMamba: 9 B L D N + B L D
    assert prof.params == sum(p.numel() for p in net.parameters()) and prof.output_shape == (c, s * H, s * W)


def test_published_macs_of_the_light_models(tmp_path: Path) -> None:
    """The MambaIRv2 paper's MACs column: fvcore's counts plus 9 B L D N + B L D for the scan, HR 1280 x 720
    (the official analysis script profiles an input of 720 // s x 1280 // s)."""
    out = run_cli('mambair-profile', '--task', *PAPER_MACS, cwd=tmp_path).stdout
    for name, paper in PAPER_MACS.items():
        block = out.split(f'{name}: ')[1]
        total = re.search(r'^total\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$', block, re.M)
        assert total, block
        without_scan, scan, ours, published = map(float, total.groups())
        assert abs(published - paper) / paper < 0.005, (name, published, paper)  # x2 0.03 %, x3 0.4 %, x4 0.06 %
        assert ours == pytest.approx(without_scan + scan, abs=0.002) and published > ours > without_scan
    assert 'lightSR_x2: MambaIR, 905,016 parameters; input 3x360x640 -> output 3x720x1280' in out


def test_profile_of_a_checkpoint_and_errors(tmp_path: Path, capsys, reference_dir: Path) -> None:
    ref = torch.load(reference_dir / 'tiny_mambairunet.pt', weights_only=True)
    torch.save({'params': ref['state_dict']}, tmp_path / 'unet.pth')
    assert profile_cli.main(['--weights', str(tmp_path / 'unet.pth'), '--input', '20x24', '--json']) == 0
    [result] = json.loads(capsys.readouterr().out)
    expected = profile_config(ref['arch_type'], ref['kwargs'], (20, 24))
    assert result['params'] == ref['param_count'] == expected.params and result['total'] == expected.total()
    assert profile_cli.main(['--task', 'lightSR_x5']) == 2
    assert "unknown MambaIR task preset 'lightSR_x5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_cli.main(['--task', 'lightSR_x2', '--input', '64'])
