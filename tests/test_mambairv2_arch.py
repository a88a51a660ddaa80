"""MambaIRv2 / MambaIRv2Light: official outputs and parameter counts, routing modes, determinism, gradients, heads."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import V2_REFERENCE_FILES, arch_class

import basicsr_mambair  # noqa: F401  (registers the archs)
from basicsr_mambair.archs import assm as assm_module
from basicsr_mambair.archs.assm import ASSM, sort_permutation
from basicsr_mambair.archs.mambairv2_arch import MambaIRv2, MambaIRv2Light, mirror_pad
from basicsr_mambair.archs.window_attention import relative_position_index, shifted_window_mask
from basicsr_mambair.ops import scan_backend

# network_g of the official option files (spec Table A) and the counts measured on the official classes (spec 5).
_LIGHT = {'in_chans': 3, 'img_size': 64, 'img_range': 1.0, 'embed_dim': 48, 'depths': [5] * 4, 'num_heads': [4] * 4,
          'window_size': 16, 'inner_rank': 32, 'num_tokens': 64, 'convffn_kernel_size': 5, 'mlp_ratio': 1.0,
          'd_state': 8, 'upsampler': 'pixelshuffledirect', 'resi_connection': '1conv'}
_BASE = {'in_chans': 3, 'img_size': 64, 'img_range': 1.0, 'embed_dim': 174, 'depths': [6] * 6, 'num_heads': [6] * 6,
         'window_size': 16, 'inner_rank': 64, 'num_tokens': 128, 'convffn_kernel_size': 5, 'mlp_ratio': 2.0,
         'd_state': 16, 'upsampler': 'pixelshuffle', 'resi_connection': '1conv'}
_SMALL = {**_BASE, 'embed_dim': 132, 'depths': [4] * 6, 'num_heads': [4] * 6}
_LARGE = {**_BASE, 'depths': [6] * 9, 'num_heads': [6] * 9}
_RESTORATION = {k: v for k, v in _BASE.items() if k not in ('upsampler', 'resi_connection')}
OFFICIAL_V2 = {  # name: (arch, network_g without type, parameters, state-dict keys incl. the buffer)
    'lightSR_x2': ('MambaIRv2Light', {**_LIGHT, 'upscale': 2}, 774_092, 1019),
    'lightSR_x3': ('MambaIRv2Light', {**_LIGHT, 'upscale': 3}, 780_587, 1019),
    'lightSR_x4': ('MambaIRv2Light', {**_LIGHT, 'upscale': 4}, 789_680, 1019),
    'SRSmall_x2': ('MambaIRv2', {**_SMALL, 'upscale': 2}, 9_621_935, 1131),
    'SRSmall_x3': ('MambaIRv2', {**_SMALL, 'upscale': 3}, 9_806_575, 1131),
    'SRSmall_x4': ('MambaIRv2', {**_SMALL, 'upscale': 4}, 9_769_647, 1133),
    'SR_x2': ('MambaIRv2', {**_BASE, 'upscale': 2}, 22_903_001, 1683),
    'SR_x3': ('MambaIRv2', {**_BASE, 'upscale': 3}, 23_087_641, 1683),
    'SR_x4': ('MambaIRv2', {**_BASE, 'upscale': 4}, 23_050_713, 1685),
    'SRLarge_x2': ('MambaIRv2', {**_LARGE, 'upscale': 2}, 34_090_523, 2517),
    'SRLarge_x3': ('MambaIRv2', {**_LARGE, 'upscale': 3}, 34_275_163, 2517),
    'SRLarge_x4': ('MambaIRv2', {**_LARGE, 'upscale': 4}, 34_238_235, 2519),
    'ColorDN_level15': ('MambaIRv2', {**_RESTORATION, 'upscale': 1, 'img_size': 128}, 22_657_971, 1679),
    'CAR_q10': ('MambaIRv2', {**{k: v for k, v in _RESTORATION.items() if k != 'img_range'}, 'upscale': 1,
                              'in_chans': 1, 'img_size': 126}, 22_651_705, 1679),
}

TINY = {'embed_dim': 24, 'd_state': 4, 'depths': [2], 'num_heads': [2], 'window_size': 8, 'inner_rank': 8,
        'num_tokens': 8, 'mlp_ratio': 1.0}


def load_reference(reference_dir: Path, name: str) -> dict:
    return torch.load(reference_dir / name, map_location='cpu', weights_only=True)


def reference_model(reference_dir: Path, name: str) -> tuple[torch.nn.Module, dict]:
    ref = load_reference(reference_dir, name)
    model = arch_class(ref['arch_type'])(**ref['kwargs'])
    model.load_state_dict(ref['state_dict'], strict=True)
    return model.eval(), ref


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward(model: torch.nn.Module, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """A no-grad forward with ``threads`` torch threads (the tests otherwise run single-threaded)."""
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# the official network: outputs, parameters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('backend', ['compiled', 'torch'])
@pytest.mark.parametrize('name', V2_REFERENCE_FILES)
def test_matches_official_output(reference_dir: Path, name: str, backend: str) -> None:
    """Strict load, official parameter count, and in eval (deterministic routing) the official output with
    a stable sort (the portable target, spec 2.10) to 1e-4, through both CPU scans."""
    ref = load_reference(reference_dir, name)
    model = arch_class(ref['arch_type'])(**ref['kwargs'])
    assert n_params(model) == ref['param_count']
    model.load_state_dict(ref['state_dict'], strict=True)
    model.eval()
    assert not model.training and model.routes_deterministically()
    with scan_backend(backend):
        out = forward(model, ref['input'])
    assert out.shape == ref['output_stable_sort'].shape
    assert (out - ref['output_stable_sort']).abs().max().item() < 1e-4


def test_reference_files_are_all_covered(reference_dir: Path) -> None:
    """Every MambaIRv2 reference file is in V2_REFERENCE_FILES (new ones must not be silently skipped)."""
    ours = {path.name for path in reference_dir.glob('*.pt')
            if load_reference(reference_dir, path.name)['arch_type'] in ('MambaIRv2', 'MambaIRv2Light')}
    assert ours == set(V2_REFERENCE_FILES)


def test_group_outputs_match_official(reference_dir: Path) -> None:
    """Intermediate check on the real light-SR config: the tokens after every group (padded 32 x 32 map)."""
    model, ref = reference_model(reference_dir, 'mambairv2_lightSR_x2.pt')
    x = (mirror_pad(ref['input'], model.window_size) - model.mean) * model.img_range
    h, w = x.shape[-2:]
    params = {'attn_mask': shifted_window_mask(h, w, 16, 8), 'rpi_sa': model.relative_position_index_SA}
    with torch.no_grad():
        t = model.patch_embed(model.conv_first(x))
        for i, layer in enumerate(model.layers):
            t = layer(t, (h, w), params)
            assert (t - ref['layer_outputs_stable_sort'][f'layers.{i}']).abs().max().item() < 1e-4


@pytest.mark.parametrize('name', list(OFFICIAL_V2))
def test_official_parameter_and_key_counts(name: str) -> None:
    arch, kwargs, params, keys = OFFICIAL_V2[name]
    model = arch_class(arch)(**kwargs)
    state = model.state_dict()
    assert n_params(model) == params
    assert len(state) == keys
    assert next(iter(state)) == 'relative_position_index_SA'  # the only buffer, persistent, int64
    assert [name for name, _ in model.named_buffers()] == ['relative_position_index_SA']
    assert state['relative_position_index_SA'].dtype == torch.int64
    assert state['relative_position_index_SA'].shape == (256, 256)


def test_light_model_differs_only_by_its_ffn() -> None:
    torch.manual_seed(0)
    full, light = MambaIRv2(**TINY), MambaIRv2Light(**TINY)
    assert isinstance(light, MambaIRv2)
    ffn_keys = ('convffn1', 'convffn2')
    strip = lambda keys: {k for k in keys if not any(f in k for f in ffn_keys)}  # noqa: E731
    assert strip(full.state_dict()) == strip(light.state_dict())
    layer = light.layers[0].residual_group.layers[0]
    assert {k for k in layer.state_dict() if k.startswith('convffn1.')} == {
        'convffn1.fc1.weight', 'convffn1.fc1.bias', 'convffn1.sg.norm.weight', 'convffn1.sg.norm.bias',
        'convffn1.sg.conv.weight', 'convffn1.sg.conv.bias', 'convffn1.fc2.weight', 'convffn1.fc2.bias'}
    assert layer.convffn1.fc2.in_features == 12  # GatedMLP: fc2 reads half of the 24 hidden channels


# ------------------------------------------------------------------------------------------------
# routing modes and determinism
# ------------------------------------------------------------------------------------------------
def real_crops(shared_data: Path, size: tuple[int, int] = (28, 40)) -> torch.Tensor:
    """(2, 3, H, W) crops of two Set14 x2 LR images in [0, 1] (sides not multiples of the 16 window)."""
    crops = []
    for name in ('comicx2.png', 'zebrax2.png'):
        img = cv2.imread(str(shared_data / 'Set14' / 'LR_bicubic' / 'X2' / name), cv2.IMREAD_COLOR)
        crops.append(torch.from_numpy(np.ascontiguousarray(img[:size[0], :size[1], ::-1])).permute(2, 0, 1))
    return torch.stack(crops).float() / 255


def test_deterministic_routing_is_a_function_of_the_input(reference_dir: Path, shared_data: Path) -> None:
    """The real light-SR x2 network on real images, exactly (bitwise): with 2 threads, and for a batch vs its
    images one by one (each also a second run). A 1-ulp difference can flip a near-tie of a route's argmax and
    then moves the output by ~1e-3, so only exact equality shows the guarantee. (The batched forward is not
    bitwise equal here: oneDNN's 3-channel conv_first rounds differently for batches of 1 and 2.)"""
    model, _ = reference_model(reference_dir, 'mambairv2_lightSR_x2.pt')
    x = real_crops(shared_data)
    out = forward(model, x)
    assert torch.isfinite(out).all() and out.shape == (2, 3, 56, 80)
    assert torch.equal(forward(model, x, threads=2), out)
    for i in range(len(x)):
        assert torch.equal(forward(model, x[i:i + 1].clone()), out[i:i + 1])


def test_deterministic_routing_with_two_groups_and_window_8(reference_dir: Path) -> None:
    """The same guarantees on the tiny two-group reference net and input, and an explicit 'deterministic'
    routing in train() gives the eval output."""
    model, ref = reference_model(reference_dir, 'tiny_mambairv2_SR_x2.pt')
    x = ref['input']
    out = forward(model, x)
    assert torch.equal(forward(model, x, threads=2), out)
    assert torch.equal(forward(model, x[1:].clone()), out[1:])
    model.train()
    model.routing = 'deterministic'
    assert torch.equal(forward(model, x), out)


def test_gumbel_routing_follows_the_seed() -> None:
    torch.manual_seed(0)
    model = MambaIRv2(upscale=2, upsampler='pixelshuffle', **TINY).eval()
    x = torch.rand(2, 3, 12, 20)
    deterministic = forward(model, x)
    model.routing = 'gumbel'
    assert all(m.routing == 'gumbel' for m in model.modules() if isinstance(m, ASSM)) and model.routing == 'gumbel'
    outs = {}
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.setdefault(seed, []).append(forward(model, x))
    assert torch.equal(outs[1][0], outs[1][1])
    assert not torch.equal(outs[1][0], outs[2][0])
    assert not torch.equal(outs[1][0], deterministic)
    # routing None: Gumbel in train(), deterministic in eval()
    model.set_routing(None).train()
    assert not model.routes_deterministically()
    assert not torch.equal(forward(model, x), forward(model, x))
    assert torch.equal(forward(model.eval(), x), deterministic)


def test_routing_values_are_checked() -> None:
    with pytest.raises(ValueError, match="'argmax'"):
        MambaIRv2(routing='argmax', **TINY)
    model = MambaIRv2(routing='gumbel', **TINY)
    assert model.routing == 'gumbel'
    with pytest.raises(ValueError, match="'noisy'"):
        model.routing = 'noisy'
    assert model.routing == 'gumbel'


def test_sort_permutation_is_stable_and_inverted() -> None:
    classes = torch.tensor([[2, 0, 2, 1, 0, 2], [1, 1, 1, 1, 1, 1]])
    idx, inv = sort_permutation(classes)
    assert idx.tolist() == [[1, 4, 3, 0, 2, 5], [0, 1, 2, 3, 4, 5]]  # ties keep raster order
    x = torch.randn(2, 6)
    assert torch.equal(x.gather(1, idx).gather(1, inv), x)


# ------------------------------------------------------------------------------------------------
# training: gradients, checkpointing, autocast
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch,routing', [(MambaIRv2, 'gumbel'), (MambaIRv2Light, 'gumbel'),
                                          (MambaIRv2, 'deterministic')])
def test_gradients_reach_every_parameter(arch: type[MambaIRv2], routing: str) -> None:
    """Straight-through routing: the route Linears and both embeddings get gradients too."""
    torch.manual_seed(0)
    model = arch(upscale=2, upsampler='pixelshuffle', resi_connection='3conv', routing=routing, **TINY).train()
    x = torch.rand(2, 3, 12, 10)
    F.l1_loss(model(x), torch.rand(2, 3, 24, 20)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_replays_the_gumbel_noise() -> None:
    torch.manual_seed(0)
    plain = MambaIRv2(upscale=2, upsampler='pixelshuffledirect', **TINY).train()
    ckpt = MambaIRv2(upscale=2, upsampler='pixelshuffledirect', use_checkpoint=True, **TINY).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 9, 8)
    for model in (plain, ckpt):
        torch.manual_seed(5)
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7), name


def test_bf16_autocast_keeps_the_scan_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = MambaIRv2(upscale=2, upsampler='pixelshuffle', **TINY).eval()
    x = torch.rand(1, 3, 8, 8)
    calls = []

    def spy(real_scan):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            calls.append(({t.dtype for t in tensors}, torch.is_autocast_enabled('cpu')))
            return real_scan(*args, **kwargs)
        return call

    for name in ('selective_scan', 'scan_permuted'):  # unfused and fused (the kernel sorts)
        monkeypatch.setattr(assm_module, name, spy(getattr(assm_module, name)))
    expected = forward(model, x)
    calls.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = forward(model, x)
    assert calls == [({torch.float32}, False)] * 2
    assert torch.isfinite(out).all() and (out.float() - expected).abs().max() < 0.05  # bf16 elsewhere: loose


# ------------------------------------------------------------------------------------------------
# heads, sizes, channels, building blocks
# ------------------------------------------------------------------------------------------------
def test_nearest_conv_head() -> None:
    torch.manual_seed(0)
    model = MambaIRv2(upscale=4, upsampler='nearest+conv', **TINY).eval()
    keys = model.state_dict()
    for key in ('conv_before_upsample.0', 'conv_up1', 'conv_up2', 'conv_hr', 'conv_last'):
        assert f'{key}.weight' in keys and f'{key}.bias' in keys
    assert keys['conv_last.weight'].shape == (3, 64, 3, 3)
    out = forward(model, torch.rand(1, 3, 7, 9))
    assert out.shape == (1, 3, 28, 36) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match='upscale 4'):
        MambaIRv2(upscale=2, upsampler='nearest+conv', **TINY)


@pytest.mark.parametrize('in_chans,upsampler,upscale,size', [(1, 'pixelshuffle', 2, (5, 11)), (1, '', 1, (3, 2)),
                                                             (3, 'pixelshuffledirect', 3, (13, 7))])
def test_odd_sizes_and_one_channel(in_chans: int, upsampler: str, upscale: int, size: tuple[int, int]) -> None:
    """Sides below the window (pad larger than the side too, which the official code cannot) and 1 channel."""
    torch.manual_seed(0)
    model = MambaIRv2Light(in_chans=in_chans, upscale=upscale, upsampler=upsampler, **TINY).eval()
    x = torch.rand(2, in_chans, *size)
    out = forward(model, x)
    assert out.shape == (2, in_chans, size[0] * upscale, size[1] * upscale) and torch.isfinite(out).all()
    assert torch.equal(forward(model, x[1:].clone()), out[1:])


def test_absolute_position_embedding_needs_the_img_size() -> None:
    """``ape`` (officially unused): a learned (1, img_size^2, C) embedding, so the padded input must match it."""
    model = MambaIRv2(ape=True, img_size=16, upscale=1, **TINY).eval()
    assert model.absolute_pos_embed.shape == (1, 256, 24)
    assert forward(model, torch.rand(1, 3, 13, 16)).shape == (1, 3, 13, 16)  # padded to 16 x 16
    with pytest.raises(ValueError, match='ape: the padded input has 384 positions, the embedding 256'):
        forward(model, torch.rand(1, 3, 24, 16))


def test_mirror_pad_is_symmetric_padding() -> None:
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    official = torch.cat([x, x.flip(2)], 2)[:, :, :8, :]  # the official formula, valid for pads <= the side
    official = torch.cat([official, official.flip(3)], 3)[:, :, :, :8]
    assert torch.equal(mirror_pad(x, 8), official)
    for multiple in (4, 16, 24):  # pads beyond the side continue periodically, as numpy's 'symmetric'
        h, w = -(-5 // multiple) * multiple, -(-7 // multiple) * multiple
        expected = np.pad(x.numpy(), ((0, 0), (0, 0), (0, h - 5), (0, w - 7)), mode='symmetric')
        assert np.array_equal(mirror_pad(x, multiple).numpy(), expected)


def test_relative_position_index_and_shift_mask() -> None:
    assert relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    mask = shifted_window_mask(16, 24, 8, 4)  # 2 x 3 windows of 64 positions
    assert mask.shape == (6, 64, 64) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all() and (mask[1] == 0).all()  # windows away from the wrapped border
    # bottom-right window: four 4 x 4 regions, each position sees its own 16
    assert ((mask[5] == 0).sum(1) == 16).all()
    assert ((mask[2] == 0).sum(1) == 32).all() and ((mask[3] == 0).sum(1) == 32).all()


def test_initialisation_follows_the_official_rules() -> None:
    """Spec 2.9: what training from scratch starts from."""
    torch.manual_seed(0)
    model = MambaIRv2(**{**TINY, 'embed_dim': 48, 'mlp_ratio': 2.0, 'd_state': 8})
    layer = model.layers[0].residual_group.layers[1]
    scan = layer.assm.selectiveScan
    assert (scan.d_inner, scan.dt_rank) == (96, 6)
    assert torch.equal(layer.scale1, torch.full((48,), 1e-4)) and torch.equal(layer.scale2, layer.scale1)
    assert layer.embeddingA.weight.abs().max() <= 1 / 8 and layer.assm.embeddingB.weight.abs().max() <= 1 / 8
    assert torch.equal(scan.A_logs, torch.log(torch.arange(1.0, 9.0)).expand(96, 8))
    assert torch.equal(scan.Ds, torch.ones(96))
    dt = F.softplus(scan.dt_projs_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert abs(layer.wqkv.weight.std().item() - 0.02) < 0.003 and not layer.wqkv.bias.any()
    assert abs(layer.assm.route[0].weight.std().item() - 0.02) < 0.005
    table = layer.win_mhsa.relative_position_bias_table
    assert table.shape == (225, 2) and abs(table.std().item() - 0.02) < 0.005  # trunc_normal(0.02)
