"""Checkpoint handling: safe reading, config inference from keys/shapes, explanatory loading errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import REFERENCE_FILES, V2_REFERENCE_FILES, arch_class, constructor_args

import basicsr_mambair  # noqa: F401  (registers the archs)
from basicsr_mambair.archs.mambair_arch import MambaIR
from basicsr_mambair.archs.support import FAMILIES, constructor_defaults, family, infer_config
from basicsr_mambair.errors import CheckpointError
from basicsr_mambair.models.mambair_model import MambaIRModel
from basicsr_mambair.presets import PRESETS
from basicsr_mambair.utils.checkpoint import load_checked, read_state_dict


def assert_inferred(state_dict: dict, arch_type: str, kwargs: dict) -> None:
    inferred_type, inferred = infer_config(state_dict)
    assert inferred_type == arch_type
    expected = constructor_args(arch_type, kwargs)
    assert inferred == {k: expected[k] for k in inferred}


@pytest.fixture(scope='module')
def x2_reference(reference_dir: Path) -> dict:
    return torch.load(reference_dir / 'tiny_mambair_classicSR_x2.pt', weights_only=True)


# ---------------------------------------------------------------------------------------------- infer_config


# (arch type, constructor arguments): every official preset and unusual variants of each family. Each must
# round-trip: infer the config from the state dict, build that (plus the arguments that leave no trace in the
# weights, e.g. img_range), load strictly, and give the same output (spandrel's assert_loads_correctly).
_NETWORKS = {(p.arch_type, repr(p.kwargs)): (name, p) for name, p in reversed(PRESETS.items())}  # colorDN_* share one
ROUND_TRIPS = [
    *[pytest.param(p.arch_type, p.kwargs, id=name) for name, p in reversed(_NETWORKS.values())],
    pytest.param('MambaIR', {'in_chans': 1, 'embed_dim': 48, 'depths': [1, 2, 1], 'd_state': 6, 'mlp_ratio': 1.5,
                             'upscale': 8, 'upsampler': 'pixelshuffle', 'resi_connection': '3conv',
                             'patch_norm': False}, id='mambair-x8-3conv-gray-no-patch-norm'),
    pytest.param('MambaIR', {'in_chans': 1, 'embed_dim': 30, 'depths': [2], 'd_state': 4, 'mlp_ratio': 1.2,
                             'upscale': 1, 'img_range': 255.0}, id='mambair-car-img-range-255'),
    pytest.param('MambaIR', {'embed_dim': 40, 'depths': [1, 1, 1, 1, 1], 'd_state': 8, 'mlp_ratio': 2.5,
                             'upscale': 3, 'upsampler': 'pixelshuffledirect'}, id='mambair-light-x3-five-groups'),
    pytest.param('MambaIR', {'embed_dim': 30, 'depths': [2, 1], 'd_state': 4, 'mlp_ratio': 1.2, 'upscale': 4,
                             'upsampler': 'nearest+conv', 'resi_connection': '3conv'}, id='mambair-realsr-tiny'),
    pytest.param('MambaIRUNet', {'dim': 32, 'num_blocks': [1, 2, 1, 2], 'num_refinement_blocks': 1,
                                 'mlp_ratio': 1.2, 'bias': True}, id='unet-bias-other-depths'),
    pytest.param('MambaIRUNet', {'inp_channels': 3, 'out_channels': 6, 'dim': 32, 'num_blocks': [1, 1, 1, 1],
                                 'num_refinement_blocks': 0, 'mlp_ratio': 2.0, 'dual_pixel_task': True},
                 id='unet-dual-pixel'),
    pytest.param('MambaIRv2', {'in_chans': 1, 'embed_dim': 24, 'depths': [1, 2], 'num_heads': [2, 3], 'window_size': 8,
                               'inner_rank': 8, 'num_tokens': 12, 'd_state': 4, 'mlp_ratio': 1.5,
                               'convffn_kernel_size': 3, 'upscale': 4, 'upsampler': 'nearest+conv',
                               'resi_connection': '3conv', 'qkv_bias': False, 'patch_norm': False},
                 id='v2-nearest-conv-3conv-gray-window8-heads-per-group'),
    pytest.param('MambaIRv2Light', {'embed_dim': 30, 'depths': [2], 'num_heads': [5], 'window_size': 4,
                                    'inner_rank': 6, 'num_tokens': 10, 'd_state': 6, 'mlp_ratio': 2.0, 'upscale': 3,
                                    'upsampler': 'pixelshuffle', 'ape': True, 'img_size': 16},
                 id='v2light-x3-pixelshuffle-window4-ape'),
    pytest.param('MambaIRv2', {'embed_dim': 18, 'depths': [1], 'num_heads': [3], 'window_size': 8, 'inner_rank': 4,
                               'num_tokens': 4, 'd_state': 2, 'mlp_ratio': 1.0, 'upscale': 1, 'img_range': 255.0},
                 id='v2-dn-img-range-255'),
]


@pytest.mark.parametrize(('arch_type', 'kwargs'), ROUND_TRIPS)
def test_config_inference_round_trips(arch_type: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    net = arch_class(arch_type)(**kwargs).eval()
    assert_inferred(net.state_dict(), arch_type, kwargs)
    _, inferred = infer_config(net.state_dict())
    # (img_size leaves a trace only through MambaIRv2's absolute position embedding: then it is inferred)
    untraced = {k: kwargs[k] for k in family(arch_type).untraced if k in kwargs and k not in inferred}
    again = arch_class(arch_type)(**inferred, **untraced).eval()
    again.load_state_dict(net.state_dict(), strict=True)
    channels = kwargs.get('in_chans', kwargs.get('inp_channels', 3))
    x = torch.rand(1, channels, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


@pytest.mark.parametrize('arch_type', list(FAMILIES))
def test_untraced_arguments_are_the_constructor_defaults(arch_type: str) -> None:
    """What a network loaded from weights gets for the arguments the weights cannot tell (written in code)."""
    defaults = constructor_defaults(arch_type)
    assert family(arch_type).untraced and all(defaults[k] == v for k, v in family(arch_type).untraced.items())


@pytest.mark.parametrize('name', REFERENCE_FILES + V2_REFERENCE_FILES)
def test_infer_config_of_reference_checkpoints(reference_dir: Path, name: str) -> None:
    ref = torch.load(reference_dir / name, weights_only=True)
    assert_inferred(ref['state_dict'], ref['arch_type'], ref['kwargs'])


def test_infer_config_names_inconsistent_keys(x2_reference: dict) -> None:
    sd = dict(x2_reference['state_dict'])
    sd['layers.1.residual_group.blocks.1.self_attention.A_logs'] = torch.zeros(4 * 72, 8)
    with pytest.raises(CheckpointError, match=r'layers\.1\.residual_group\.blocks\.1.*x_proj_weight'):
        infer_config(sd)
    with pytest.raises(CheckpointError, match='not a MambaIR-family state dict'):
        infer_config({'conv.weight': torch.zeros(1)})


@pytest.mark.parametrize('change, message', [
    (('layers.1.residual_group.layers.0.assm.selectiveScan.A_logs', (96, 4)),
     r'cannot infer the MambaIRv2 config: layers\.1\.residual_group\.layers\.0\.assm\.selectiveScan\.A_logs '
     r'has shape \(96, 4\), expected \(96, 8\) for embed_dim 48, hidden 96, d_state 8, inner_rank 16'),
    (('layers.0.residual_group.layers.1.win_mhsa.relative_position_bias_table', (225, 2)),
     r'layers\.0\.residual_group\.layers\.1\.: 2 heads, layer 0 of the group 4'),
    (('layers.1.residual_group.layers.1.win_mhsa.relative_position_bias_table', (224, 4)),
     r'layers\.1\.residual_group\.layers\.1\.win_mhsa\.relative_position_bias_table has 224 rows'),
    (('layers.1.residual_group.layers.1.win_mhsa.relative_position_bias_table', (961, 4)),
     r'layers\.1\.residual_group\.layers\.1\.: window_size 16 vs 8 in layer 0 of group 0'),
    (('relative_position_index_SA', (256, 256)), r'relative_position_index_SA has shape \(256, 256\), but the '
                                                 r'attention tables say window_size 8'),
])
def test_infer_config_names_inconsistent_v2_keys(reference_dir: Path, change: tuple, message: str) -> None:
    sd = dict(torch.load(reference_dir / 'tiny_mambairv2_SR_x2.pt', weights_only=True)['state_dict'])
    key, new_shape = change
    assert key in sd
    sd[key] = torch.zeros(new_shape)
    with pytest.raises(CheckpointError, match=message):
        infer_config(sd)


def test_infer_config_tells_the_v2_models_apart_by_their_ffn(reference_dir: Path) -> None:
    light = torch.load(reference_dir / 'tiny_mambairv2light_x4.pt', weights_only=True)['state_dict']
    assert infer_config(light)[0] == 'MambaIRv2Light'
    sd = dict(torch.load(reference_dir / 'tiny_mambairv2_SR_x2.pt', weights_only=True)['state_dict'])
    assert infer_config(sd)[0] == 'MambaIRv2'
    prefix = 'layers.1.residual_group.layers.0.convffn1.'
    sd[prefix + 'sg.conv.weight'] = torch.zeros(48, 1, 5, 5)  # one GatedMLP key among ConvFFNs
    with pytest.raises(CheckpointError, match=r'cannot infer the MambaIRv2Light config: layers\.0\.residual_group'
                                              r'\.layers\.0\.: MambaIRv2 feed-forward keys \(convffn1\.dwconv\.\*\)'):
        infer_config(sd)


def test_infer_config_recognises_old_light_checkpoints() -> None:
    """A Mar-2024 light model (classic CAB + pixelshuffledirect) cannot be loaded by the current code: say so."""
    net = MambaIR(embed_dim=36, depths=[1], upscale=2, upsampler='pixelshuffle')
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith(('conv_before_upsample', 'upsample',
                                                                          'conv_last'))}
    sd['upsample.0.weight'] = torch.zeros(12, 36, 3, 3)
    with pytest.raises(CheckpointError, match='before Oct 2024'):
        infer_config(sd)


def test_infer_config_checks_the_nearest_conv_head() -> None:
    """The real-SR head: every conv of it must be there, with the classic CAB (the only one MambaIR pairs it with)."""
    sd = MambaIR(embed_dim=30, depths=[1], d_state=4, upscale=4, upsampler='nearest+conv').state_dict()
    with pytest.raises(CheckpointError, match="'conv_hr.weight' is missing"):
        infer_config({k: v for k, v in sd.items() if not k.startswith('conv_hr.')})
    light = MambaIR(embed_dim=30, depths=[1], d_state=4, upscale=4, upsampler='pixelshuffledirect').state_dict()
    mixed = {**{k: v for k, v in light.items() if not k.startswith('upsample.')},
             **{k: v for k, v in sd.items() if not k.startswith('layers.')}}
    with pytest.raises(CheckpointError, match='light CAB keys .* with a nearest\\+conv head'):
        infer_config(mixed)


# ---------------------------------------------------------------------------------------------- load_checked


def test_load_checked_loads_a_fitting_checkpoint(x2_reference: dict) -> None:
    net = MambaIR(**x2_reference['kwargs'])
    report = load_checked(net, x2_reference['state_dict'])
    assert report.ok
    assert all(torch.equal(v, x2_reference['state_dict'][k]) for k, v in net.state_dict().items())


def test_load_checked_names_another_embed_dim(x2_reference: dict) -> None:
    net = MambaIR(**{**x2_reference['kwargs'], 'embed_dim': 48})
    with pytest.raises(CheckpointError) as info:
        load_checked(net, x2_reference['state_dict'], source='x2.pth')
    message = str(info.value)
    assert 'embed_dim: 36 in checkpoint, 48 in network options' in message
    assert 'x2.pth' in message and 'wrongly shaped keys' in message and 'conv_first.weight' in message
    assert 'more)' in message  # long lists are truncated


def test_load_checked_names_another_upscale(x2_reference: dict) -> None:
    net = MambaIR(**{**x2_reference['kwargs'], 'upscale': 4})
    with pytest.raises(CheckpointError) as info:
        load_checked(net, x2_reference['state_dict'])
    message = str(info.value)
    assert 'upscale: 2 in checkpoint, 4 in network options' in message
    assert 'missing keys (2): upsample.2.weight, upsample.2.bias' in message


def test_load_checked_names_a_unet_checkpoint_in_mambair(reference_dir: Path, x2_reference: dict) -> None:
    unet = torch.load(reference_dir / 'tiny_mambairunet.pt', weights_only=True)['state_dict']
    with pytest.raises(CheckpointError, match='the checkpoint is a MambaIRUNet checkpoint, the network is MambaIR'):
        load_checked(MambaIR(**x2_reference['kwargs']), unet)


def test_load_checked_non_strict_skips_wrong_shapes(x2_reference: dict, caplog: pytest.LogCaptureFixture) -> None:
    """BasicSR's strict_load_g: false -- how the x3 model starts from the x2 weights."""
    net = MambaIR(**{**x2_reference['kwargs'], 'upscale': 3})
    before = net.upsample[0].weight.clone()
    with caplog.at_level(logging.WARNING, logger='basicsr'):
        report = load_checked(net, x2_reference['state_dict'], strict=False)
    assert [k for k, _, _ in report.mismatched] == ['upsample.0.weight', 'upsample.0.bias']
    assert torch.equal(net.upsample[0].weight, before)
    assert torch.equal(net.conv_first.weight, x2_reference['state_dict']['conv_first.weight'])
    assert 'upscale: 2 in checkpoint, 3 in network options' in caplog.text
    assert 'Size mismatch for upsample.0.weight' in caplog.text


# ---------------------------------------------------------------------------------------------- read_state_dict


def small_state_dict() -> dict:
    return {'conv.weight': torch.arange(6.0).view(2, 3), 'conv.bias': torch.ones(2)}


@pytest.mark.parametrize('layout', ['params', 'bare', 'module'])
def test_read_state_dict_layouts(tmp_path: Path, layout: str) -> None:
    sd = small_state_dict()
    content = {'params': sd} if layout == 'params' else sd
    if layout == 'module':
        content = {'params': {f'module.{k}': v for k, v in sd.items()}}
    torch.save(content, tmp_path / 'ckpt.pth')
    out = read_state_dict(tmp_path / 'ckpt.pth')
    assert list(out) == list(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_read_state_dict_params_ema(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd, ema = small_state_dict(), {k: v + 1 for k, v in small_state_dict().items()}
    torch.save({'params': sd, 'params_ema': ema}, tmp_path / 'both.pth')
    assert torch.equal(read_state_dict(tmp_path / 'both.pth', 'params_ema')['conv.bias'], ema['conv.bias'])
    assert torch.equal(read_state_dict(tmp_path / 'both.pth')['conv.bias'], sd['conv.bias'])
    torch.save({'params': sd}, tmp_path / 'plain.pth')
    with caplog.at_level(logging.INFO, logger='basicsr'):
        assert torch.equal(read_state_dict(tmp_path / 'plain.pth', 'params_ema')['conv.bias'], sd['conv.bias'])
    assert 'params_ema does not exist, use params' in caplog.text
    torch.save({'net': sd}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match="no state dict under 'params'.*'net'"):
        read_state_dict(tmp_path / 'other.pth')


class _Payload:
    """Unpickling this would create a file (stands for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_read_state_dict_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / 'payload-ran'
    torch.save({'params': small_state_dict(), 'extra': _Payload(marker)}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match='refusing to load .*evil.pth.*arbitrary code') as info:
        read_state_dict(tmp_path / 'evil.pth')
    assert 'mkdir' in str(info.value)  # names what it refused
    assert not marker.exists()


def test_read_state_dict_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        read_state_dict(tmp_path / 'absent.pth')
    torch.save({'params': {'w': torch.zeros(1000)}}, tmp_path / 'ok.pth')
    data = (tmp_path / 'ok.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        read_state_dict(tmp_path / 'truncated.pth')
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        read_state_dict(tmp_path / 'text.pth')


# ---------------------------------------------------------------------------------------------- MambaIRModel


def test_model_load_network_uses_the_checked_loader(tmp_path: Path, x2_reference: dict) -> None:
    path = tmp_path / 'net_g.pth'
    torch.save({'params': {f'module.{k}': v for k, v in x2_reference['state_dict'].items()}}, path)
    model = MambaIRModel.__new__(MambaIRModel)  # load_network needs no training state
    net = MambaIR(**x2_reference['kwargs'])
    model.load_network(net, str(path), strict=True, param_key='params_ema')  # falls back to params
    assert torch.equal(net.conv_first.weight, x2_reference['state_dict']['conv_first.weight'])
    with pytest.raises(CheckpointError, match='upscale: 2 in checkpoint, 4 in network options'):
        model.load_network(MambaIR(**{**x2_reference['kwargs'], 'upscale': 4}), str(path))
    model.load_network(MambaIR(**{**x2_reference['kwargs'], 'upscale': 4}), str(path), strict=False)
