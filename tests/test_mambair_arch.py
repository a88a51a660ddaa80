"""MambaIR / MambaIRUNet: equality with the official outputs, official parameter counts, shapes, dtypes, gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REFERENCE_FILES, arch_class

import basicsr_mambair  # noqa: F401  (registers the archs)
from basicsr_mambair.archs import ss2d as ss2d_module
from basicsr_mambair.archs.mambair_arch import MambaIR
from basicsr_mambair.archs.mambairunet_arch import MambaIRUNet
from basicsr_mambair.archs.ss2d import cross_merge, cross_scan
from basicsr_mambair.ops import scan_backend
from basicsr_mambair.presets import PRESETS, get_preset

# Spec section 5: measured on the official classes.
OFFICIAL_COUNTS = {  # preset: (parameters, state-dict keys)
    'classicSR_x2': (20_421_863, 926), 'classicSR_x3': (20_606_503, 926), 'classicSR_x4': (20_569_575, 928),
    'lightSR_x2': (905_016, 714), 'lightSR_x3': (913_131, 714), 'lightSR_x4': (924_492, 714),
    'colorDN_15': (15_777_507, 922), 'colorDN_25': (15_777_507, 922), 'colorDN_50': (15_777_507, 922),
    'CAR_10': (15_771_025, 922), 'CAR_30': (15_771_025, 922), 'CAR_40': (15_771_025, 922),
    'realDN': (26_779_480, 1110),
    # ours (no official config): classicSR_x4 with the nearest+conv head instead of two pixelshuffle convs,
    # 20_569_575 - 2 * (64 * 256 * 9 + 256) + 3 * (64 * 64 * 9 + 64); 4 upsample keys -> 6 conv_{up1,up2,hr} keys
    'realSR_x4': (20_384_935, 930),
}

TINY_SR = {'embed_dim': 36, 'depths': [1, 1], 'd_state': 8, 'mlp_ratio': 1.5, 'drop_path_rate': 0.0}




def load_reference(reference_dir: Path, name: str) -> dict:
    return torch.load(reference_dir / name, map_location='cpu', weights_only=True)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def open_channel_attention(model: torch.nn.Module) -> None:
    """Make every channel-attention squeeze unit active (positive bias before its ReLU).

    At C // 30 = 1 hidden unit, a random init often leaves the ReLU closed for a whole tiny batch, and the
    squeeze conv then gets an exactly zero gradient by design; opened, a zero gradient means a broken graph.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('attention.1.bias'):
                p.fill_(1.0)


@pytest.mark.parametrize('backend', ['compiled', 'compiled-unfused', 'torch'])
@pytest.mark.parametrize('name', REFERENCE_FILES)
def test_matches_official_output(reference_dir: Path, name: str, backend: str) -> None:
    """The CPU inference scans: ``compiled`` (SS2D through the fused kernel), ``compiled-unfused`` (the flat kernel on
    cross_scan copies) and ``torch`` (both compiled ones fall back to ``torch`` with a warning where the kernel cannot
    build)."""
    ref = load_reference(reference_dir, name)
    model = arch_class(ref['arch_type'])(**ref['kwargs'])
    assert n_params(model) == ref['param_count']
    model.load_state_dict(ref['state_dict'], strict=True)
    model.eval()
    with torch.no_grad(), scan_backend(backend):
        out = model(ref['input'])
    assert out.shape == ref['output'].shape
    assert (out - ref['output']).abs().max().item() < 1e-4


def test_reference_files_are_all_covered(reference_dir: Path) -> None:
    """Every MambaIR/MambaIRUNet reference file is in REFERENCE_FILES (new ones must not be silently skipped)."""
    ours = {path.name for path in reference_dir.glob('*.pt')
            if load_reference(reference_dir, path.name)['arch_type'] in ('MambaIR', 'MambaIRUNet')}
    assert ours == set(REFERENCE_FILES)


def test_group_outputs_match_official(reference_dir: Path) -> None:
    """Intermediate check on the real light-SR config: the tokens after every residual group."""
    ref = load_reference(reference_dir, 'mambair_lightSR_x2.pt')
    model = MambaIR(**ref['kwargs'])
    model.load_state_dict(ref['state_dict'])
    model.eval()
    x = (ref['input'] - model.mean) * model.img_range
    with torch.no_grad():
        f = model.conv_first(x)
        t = model.patch_embed(f)
        for i, layer in enumerate(model.layers):
            t = layer(t, f.shape[-2:])
            expected = ref['layer_outputs'][f'layers.{i}']
            assert (t - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize('name', [n for n, p in PRESETS.items() if p.arch_type in ('MambaIR', 'MambaIRUNet')])
def test_official_parameter_and_key_counts(name: str) -> None:  # MambaIRv2's: test_mambairv2_arch.py
    preset = get_preset(name)
    model = arch_class(preset.arch_type)(**preset.kwargs)
    params, keys = OFFICIAL_COUNTS[name]
    assert n_params(model) == params
    assert len(model.state_dict()) == keys
    assert not list(model.buffers())  # the RGB mean is not a buffer / state-dict entry


def test_cross_scan_orders_and_merge() -> None:
    x = torch.randn(2, 5, 3, 4)
    xs = cross_scan(x)
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    expected = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)
    assert torch.equal(xs, expected)
    # merging the four copies of the same map gives 4x the map, channels-last
    assert torch.allclose(cross_merge(xs, 3, 4), 4 * x.permute(0, 2, 3, 1))


@pytest.mark.parametrize('upsampler,upscale,resi', [('pixelshuffle', 3, '3conv'), ('pixelshuffledirect', 2, '1conv'),
                                                    ('', 1, '1conv')])
def test_gradients_reach_every_parameter(upsampler: str, upscale: int, resi: str) -> None:
    torch.manual_seed(0)
    model = MambaIR(upscale=upscale, upsampler=upsampler, resi_connection=resi, **TINY_SR)
    open_channel_attention(model)
    model.train()
    x = torch.rand(2, 3, 6, 7)
    loss = F.l1_loss(model(x), torch.rand(2, 3, 6 * upscale, 7 * upscale))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_reach_every_parameter_unet() -> None:
    torch.manual_seed(0)
    model = MambaIRUNet(dim=32, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, mlp_ratio=1.5)
    open_channel_attention(model)
    model.train()
    x = torch.rand(2, 3, 16, 16)
    F.l1_loss(model(x), torch.rand_like(x)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = MambaIR(upscale=2, upsampler='pixelshuffledirect', **TINY_SR)
    ckpt = MambaIR(upscale=2, upsampler='pixelshuffledirect', use_checkpoint=True, **TINY_SR)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 5, 6)
    for model in (plain, ckpt):
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_drop_path_is_active_in_training_only() -> None:
    torch.manual_seed(0)
    model = MambaIR(upscale=1, embed_dim=36, depths=[2], d_state=8, mlp_ratio=1.0, drop_path_rate=0.9)
    x = torch.rand(4, 3, 5, 5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize('in_chans,upsampler,upscale', [(1, 'pixelshuffle', 2), (3, 'pixelshuffle', 4),
                                                        (1, '', 1), (3, 'pixelshuffledirect', 3)])
def test_odd_sizes_channels_and_batch(in_chans: int, upsampler: str, upscale: int) -> None:
    torch.manual_seed(0)
    model = MambaIR(in_chans=in_chans, upscale=upscale, upsampler=upsampler, **TINY_SR).eval()
    x = torch.rand(2, in_chans, 7, 5)
    with torch.no_grad():
        out = model(x)
        single = model(x[1:])
    assert out.shape == (2, in_chans, 7 * upscale, 5 * upscale)
    assert torch.allclose(out[1:], single, atol=1e-5)  # samples do not interact


def test_extra_kwargs_are_ignored_and_bad_arguments_refused() -> None:
    model = MambaIR(upscale=1, window_size=8, num_heads=[6], interval=[4], **TINY_SR)
    assert model.upsampler == ''
    assert MambaIR(upscale=1, upsampler=None, **TINY_SR).upsampler == ''  # `upsampler: ~` in YAML
    with pytest.raises(ValueError, match='resi_connection'):
        MambaIR(resi_connection='2conv', **TINY_SR)
    with pytest.raises(ValueError, match='upscale 5'):
        MambaIR(upscale=5, upsampler='pixelshuffle', **TINY_SR)


def test_bf16_autocast_keeps_the_scan_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = MambaIR(upscale=2, upsampler='pixelshuffle', **TINY_SR).eval()
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        expected = model(x)

    calls = []

    def spy(real):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            calls.append(({t.dtype for t in tensors}, torch.is_autocast_enabled('cpu')))
            out = real(*args, **kwargs)
            calls[-1] += (out.dtype,)
            return out
        return call

    for name in ('selective_scan', 'scan_cross'):  # the unfused and the fused scan
        monkeypatch.setattr(ss2d_module, name, spy(getattr(ss2d_module, name)))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert len(calls) == 2
    for dtypes, autocast_on, out_dtype in calls:
        assert dtypes == {torch.float32} and not autocast_on and out_dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() < 0.05  # bf16 elsewhere: loose


def test_bfloat16_model_runs() -> None:
    torch.manual_seed(0)
    model = MambaIR(upscale=2, upsampler='pixelshuffledirect', **TINY_SR).eval()
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        expected = model(x)
        out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.1


def test_unet_pads_odd_sizes_like_the_official_validation() -> None:
    torch.manual_seed(0)
    model = MambaIRUNet(dim=32, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, mlp_ratio=1.5).eval()
    x = torch.rand(2, 3, 13, 21)
    with torch.no_grad():
        out = model(x)
        # Restormer's pad_test: reflect-pad bottom/right to a multiple of 8, forward, crop.
        padded = model(F.pad(x, (0, 3, 0, 3), mode='reflect'))
        tiny = model(torch.rand(1, 3, 3, 5))  # sides below the pad: replicate padding
    assert out.shape == x.shape
    assert torch.equal(out, padded[..., :13, :21])
    assert tiny.shape == (1, 3, 3, 5)


def test_unet_multiple_of_8_is_not_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    """For sides that are multiples of 8 the forward is the official unpadded one (the reference test checks
    the values); here: no padding op is called at all."""
    model = MambaIRUNet(dim=32, num_blocks=[1, 0, 0, 1], num_refinement_blocks=0).eval()
    calls = []
    real_pad = F.pad
    monkeypatch.setattr(F, 'pad', lambda *a, **k: calls.append(a) or real_pad(*a, **k))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 16, 8)).shape == (1, 3, 16, 8)
    assert calls == []


def test_unet_dual_pixel_variant_runs() -> None:
    model = MambaIRUNet(inp_channels=6, out_channels=3, dim=32, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                        dual_pixel_task=True).eval()
    assert 'skip_conv.weight' in model.state_dict()
    with torch.no_grad():
        assert model(torch.rand(1, 6, 8, 8)).shape == (1, 3, 8, 8)


def test_initialisation_follows_the_official_rules() -> None:
    """Spec 1.5 / 1.8: what training from scratch starts from."""
    torch.manual_seed(0)
    model = MambaIR(upscale=2, upsampler='pixelshuffle', embed_dim=48, depths=[2], d_state=8, mlp_ratio=2.0)
    ss2d = model.layers[0].residual_group.blocks[1].self_attention
    d, r = ss2d.d_inner, ss2d.dt_rank
    assert (d, r) == (96, 3)
    dt = F.softplus(ss2d.dt_projs_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert ss2d.dt_projs_weight.abs().max() <= r ** -0.5
    assert ss2d.x_proj_weight.abs().max() <= d ** -0.5
    assert torch.equal(ss2d.A_logs, torch.log(torch.arange(1.0, 9.0)).expand(4 * d, 8))
    assert torch.equal(ss2d.Ds, torch.ones(4 * d))
    assert abs(ss2d.in_proj.weight.std().item() - 0.02) < 0.002  # trunc_normal(0.02), MambaIR only
    assert torch.equal(ss2d.out_norm.weight, torch.ones(d)) and ss2d.in_proj.bias is None
