"""basicsr_mambair.spandrel: every arch family through spandrel's ModelLoader (descriptor fields, outputs equal to
ours and the official references), other architectures' files left to spandrel, no spandrel on `import`."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import spandrel  # the 'spandrel' extra; `make test` installs it (the 'test' extra names it too)
import torch
from helpers import REFERENCE_FILES, V2_REFERENCE_FILES, cli_env

import basicsr_mambair  # noqa: F401  (registers the archs)
import basicsr_mambair.spandrel as mambair_spandrel
from basicsr_mambair import load_model
from basicsr_mambair.archs.support import FAMILIES, family
from basicsr_mambair.utils.safetensors_io import save_safetensors

ALL_REFERENCES = REFERENCE_FILES + V2_REFERENCE_FILES


@pytest.fixture(scope='module')
def references(reference_dir: Path) -> dict[str, list[tuple[str, dict]]]:
    """{arch type: [(file name, reference)]} for the families this package supports."""
    found: dict[str, list[tuple[str, dict]]] = {}
    for name in ALL_REFERENCES:
        ref = torch.load(reference_dir / name, weights_only=True)
        if ref['arch_type'] in FAMILIES:
            found.setdefault(ref['arch_type'], []).append((name, ref))
    return found


@pytest.fixture(scope='module')
def registry():
    """A copy of spandrel's main registry with our architectures installed."""
    reg = spandrel.MAIN_REGISTRY.copy()
    mambair_spandrel.install(reg)
    return reg


@pytest.fixture(scope='module')
def photo(shared_data: Path) -> torch.Tensor:
    """A real image crop, (1, 3, 18, 22) RGB float in [0, 1] (sides not multiples of 8)."""
    bgr = cv2.imread(str(shared_data / 'Set14' / 'HR' / 'monarch.png'))[200:218, 300:322]
    return torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255


def untraced_are_defaults(ref: dict) -> bool:
    """Whether the reference's config is what a network loaded from weights gets (not so: img_range 255)."""
    return all(ref['kwargs'].get(k, v) == v for k, v in family(ref['arch_type']).untraced.items())


@pytest.mark.parametrize('arch_type', list(FAMILIES))
def test_reference_checkpoints_load_through_spandrel(arch_type: str, references, registry, photo,
                                                     tmp_path: Path) -> None:
    assert references.get(arch_type), f'no reference file of {arch_type} in ../shared/reference'
    for name, ref in references[arch_type]:
        pth, st = tmp_path / f'{name}.pth', tmp_path / f'{name}.safetensors'
        torch.save({'params': ref['state_dict']}, pth)
        save_safetensors({'params': ref['state_dict']}, st)
        x, official = ref['input'][:1], ref.get('output_stable_sort', ref['output'])[:1]
        scale = official.shape[-1] // x.shape[-1]
        ours = load_model(pth, device='cpu')
        image = photo.mean(1, keepdim=True) if x.shape[1] == 1 else photo  # gray for 1-channel networks
        for path in (pth, st):
            model = spandrel.ModelLoader(registry=registry).load_from_file(path)
            assert isinstance(model, spandrel.ImageModelDescriptor), name
            assert model.architecture.id == arch_type and model.scale == scale, name
            assert (model.input_channels, model.output_channels) == (x.shape[1], official.shape[1]), name
            assert model.purpose == ('SR' if scale > 1 else 'Restoration'), name
            assert model.supports_half and model.supports_bfloat16 and model.size_requirements.none, name
            assert model.tags[:len(ours.presets)] == list(ours.presets), name
            assert f'{"embed_dim" if "embed_dim" in ours.kwargs else "dim"}=' in ' '.join(model.tags), name
            with torch.no_grad():
                for inp in (x, image):
                    out = model(inp)  # spandrel's call: [0, 1] in, clamped to [0, 1] out
                    assert out.shape == (1, official.shape[1], inp.shape[2] * scale, inp.shape[3] * scale), name
                    assert (out - ours(inp).clamp(0, 1)).abs().max() <= 1e-5, name
                if untraced_are_defaults(ref):  # the official output (tiny CAR: img_range 255 is not in the weights)
                    assert (model.model(x) - official).abs().max() < 1e-4, name


def test_half_precision_descriptors_run(references, registry) -> None:
    """supports_half / supports_bfloat16: spandrel's .half() / .bfloat16() weights give the float32 result."""
    name, ref = next((n, r) for n, r in references['MambaIR'] if n == 'tiny_mambair_classicSR_x2.pt')
    model = spandrel.ModelLoader(registry=registry).load_from_state_dict({'params': ref['state_dict']})
    x = ref['input'][:1, :, :12, :12]
    expected = model(x)
    for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.02)):
        out = model.to(dtype)(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all(), (name, dtype)
        assert (out.float() - expected).abs().max() < tol, (name, dtype)
    model.float()


def _spandrel_class(arch: str) -> type[torch.nn.Module]:
    return getattr(importlib.import_module(f'spandrel.architectures.{arch}.__arch.{arch}'), arch)


def test_other_architectures_are_left_to_spandrel(references, registry) -> None:
    """SwinIR and HAT share MambaIR's top-level key names (conv_first, layers.i.residual_group.blocks.j): the
    family's key test says yes, the full config inference no, so spandrel's own architectures load them."""
    others = {
        'SwinIR': _spandrel_class('SwinIR')(embed_dim=12, depths=[2], num_heads=[2], window_size=4, upscale=2,
                                            img_size=16, upsampler='pixelshuffledirect'),
        'HAT': _spandrel_class('HAT')(embed_dim=12, depths=[2], num_heads=[2], window_size=4, upscale=2,
                                      img_size=16, compress_ratio=3, squeeze_factor=3, upsampler='pixelshuffle'),
    }
    ours = mambair_spandrel.arch_supports()
    for arch, net in others.items():
        state_dict = net.state_dict()
        assert FAMILIES['MambaIR'].detect(state_dict)  # the key-name test alone would claim it
        assert not any(support.detect(state_dict) for support in ours), arch
        model = spandrel.ModelLoader(registry=registry).load_from_state_dict(state_dict)
        assert model.architecture.id == arch and model.scale == 2
    # and no spandrel architecture claims ours (so the order of detection does not matter)
    for refs in references.values():
        for name, ref in refs:
            claimed = [a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures()
                       if a.architecture.id not in FAMILIES and a.detect(ref['state_dict'])]
            assert claimed == [], (name, claimed)
    # a damaged MambaIR state dict is nobody's
    name, ref = references['MambaIR'][0]
    damaged = dict(ref['state_dict'])
    damaged['layers.0.residual_group.blocks.0.self_attention.x_proj_weight'] = torch.zeros(4, 3, 5)
    with pytest.raises(spandrel.UnsupportedModelError):
        spandrel.ModelLoader(registry=registry).load_from_state_dict(damaged)


def test_install_into_the_main_registry_is_idempotent() -> None:
    first = mambair_spandrel.install()
    again = mambair_spandrel.install()
    assert again == [] and all(arch_type in spandrel.MAIN_REGISTRY for arch_type in FAMILIES)
    assert {s.architecture.id for s in first} <= set(FAMILIES)
    order = [a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures('detection')]
    assert set(order[:len(FAMILIES)]) == set(FAMILIES)  # ours are tried first


def test_importing_the_package_imports_neither_spandrel_nor_safetensors() -> None:
    code = ('import sys, basicsr_mambair; from basicsr_mambair import load_model; import basicsr_mambair.api; '
            'print(sorted(m for m in ("spandrel", "safetensors") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == '[]', out.stderr[-2000:]
