"""Restoring your own images: ``mambair-restore`` and ``load_model`` / ``restore``, on crops of real images.

Checkpoints are the official configurations (real sizes) with random weights; images are small crops so
that the 20M-parameter classic-SR network runs in seconds on one CPU thread.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import REFERENCE_FILES, V2_REFERENCE_FILES, arch_class, constructor_args, run_cli

import basicsr_mambair  # noqa: F401  (registers the archs; before `import basicsr`)
from basicsr_mambair.api import load_model, restore
from basicsr_mambair.archs.support import describe
from basicsr_mambair.archs.support.mambair import BYTES_PER_INNER_CHANNEL, BYTES_PER_INNER_CHANNEL_FUSED
from basicsr_mambair.cli import restore as restore_cli
from basicsr_mambair.errors import CheckpointError, OutOfMemory, RestoreError
from basicsr_mambair.memory import FIXED_BYTES, bytes_per_pixel, choose_tile, measure_peak_bytes
from basicsr_mambair.ops.scan import compiled, scan_backend, uses_fused_kernel
from basicsr_mambair.presets import PRESETS
from basicsr_mambair.tiling import forward_tiled

NOT_SHAPING = ('img_size', 'img_range', 'drop_path_rate', 'drop_rate', 'use_checkpoint', 'norm_layer', 'patch_size')


def shaping_args(arch_type: str, kwargs: dict) -> dict:
    """All constructor arguments (defaults filled in) that shape the parameters, tuples as lists."""
    return {k: v for k, v in constructor_args(arch_type, kwargs).items() if k not in NOT_SHAPING}


def make_net(name: str, seed: int = 0) -> torch.nn.Module:
    preset = PRESETS[name]
    torch.manual_seed(seed)
    return arch_class(preset.arch_type)(**preset.kwargs).eval()


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """``get(name) -> (path of {'params': state_dict}, network)`` for random-weight preset networks, made once."""
    folder = tmp_path_factory.mktemp('weights')
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in made:
            net = make_net(name)
            path = folder / f'{name}.pth'
            torch.save({'params': net.state_dict()}, path)
            made[name] = (path, net)
        return made[name]

    return get


def crop(path: Path, y: int, x: int, h: int, w: int) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return np.ascontiguousarray(image[y:y + h, x:x + w])


@pytest.fixture(scope='module')
def images(tmp_path_factory, shared_data: Path) -> Path:
    """Crops of real test images in every layout the tool handles (BGR(A) as OpenCV writes them)."""
    root = tmp_path_factory.mktemp('images')

    def save(sub: str, name: str, image: np.ndarray, params: tuple = ()) -> None:
        (root / sub).mkdir(exist_ok=True)
        assert cv2.imwrite(str(root / sub / name), image, list(params))

    rgb = crop(shared_data / 'Set5' / 'HR' / 'baby.png', 200, 180, 20, 28)
    rgba = np.dstack([crop(shared_data / 'CBSD68' / '101085.png', 100, 100, 24, 20),
                      np.tile(np.linspace(0, 255, 20).astype(np.uint8), (24, 1))])
    deep = crop(shared_data / 'McMaster' / '1.tif', 240, 240, 16, 24).astype(np.uint16) * 257
    deep[::2, ::3] += 97  # genuine 16-bit values, not only multiples of 257
    save('sr', 'baby.png', rgb)
    save('sr', 'bridge.png', crop(shared_data / 'Set14' / 'HR' / 'bridge.png', 300, 300, 22, 18))  # 1 channel
    save('sr', 'leaves.png', rgba)
    save('sr', 'mcmaster16.png', deep)
    # the 20M-parameter networks take about 1 s per 16x16 crop on one thread
    save('classic', 'bird.png', crop(shared_data / 'Set5' / 'HR' / 'bird.png', 100, 100, 14, 16))
    save('dn', 'cbsd.png', crop(shared_data / 'CBSD68' / '102061.png', 60, 80, 16, 14))
    save('car', 'barbara.bmp', crop(shared_data / 'Classic5' / 'barbara.bmp', 200, 200, 12, 14))
    save('car', 'cemetry_q10.jpg', crop(shared_data / 'LIVE1' / 'gray' / 'cemetry.png', 100, 100, 16, 16),
         (cv2.IMWRITE_JPEG_QUALITY, 10))
    save('car', 'cbsd_colour.png', crop(shared_data / 'CBSD68' / '101087.png', 50, 50, 12, 12))
    noisy = sorted((shared_data / 'SIDD_samples' / 'NOISY').glob('*.png'))
    save('real', 'sidd0.png', crop(noisy[0], 64, 64, 36, 44))  # not multiples of 8: the UNet pads
    save('real', 'sidd1_16bit.png', crop(noisy[1], 0, 0, 20, 28).astype(np.uint16) * 257)
    return root


# ---------------------------------------------------------------------------------------------------- expected


def network_output(net: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    """The network on a whole (H, W, C) float32 RGB image in [0, 1] -> (H*s, W*s, C') float32, clamped."""
    with torch.no_grad():
        out = net(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None])
    return out[0].clamp(0, 1).numpy().transpose(1, 2, 0)


def expected_result(net: torch.nn.Module, in_channels: int, scale: int, image: np.ndarray) -> np.ndarray:
    """What the documented pipeline must give for an OpenCV image (BGR(A)/gray), computed independently."""
    depth = 65535.0 if image.dtype == np.uint16 else 255.0
    x = (image if image.ndim == 3 else image[..., None]).astype(np.float32) / depth
    alpha = x[..., 3] if x.shape[2] == 4 else None
    colour = x[..., 2::-1] if x.shape[2] >= 3 else x  # BGR -> RGB
    gray_in = colour.shape[2] == 1
    if in_channels == 1 and not gray_in:
        colour = cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_RGB2GRAY)[..., None]
    if in_channels == 3 and gray_in:
        colour = np.repeat(colour, 3, axis=2)
    out = network_output(net, np.ascontiguousarray(colour))
    if in_channels == 3 and gray_in:
        out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None]
    out = out[..., ::-1] if out.shape[2] == 3 else out  # RGB -> BGR
    if alpha is not None:
        size = (out.shape[1], out.shape[0])
        resized = alpha if scale == 1 else np.clip(cv2.resize(alpha, size, interpolation=cv2.INTER_CUBIC), 0, 1)
        out = np.dstack([out, resized])
    if out.shape[2] == 1:  # as a 1-channel PNG reads back
        out = out[..., 0]
    return np.round(out * depth).astype(image.dtype)


def check_outputs(folder: Path, outdir: Path, suffix: str, net: torch.nn.Module, in_channels: int,
                  scale: int) -> None:
    for path in sorted(folder.iterdir()):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        result = cv2.imread(str(outdir / f'{path.stem}_{suffix}.png'), cv2.IMREAD_UNCHANGED)
        assert result is not None, f'no output for {path.name}'
        assert result.dtype == image.dtype, path.name  # bit depth kept
        assert result.shape[:2] == (image.shape[0] * scale, image.shape[1] * scale), path.name
        channels = 1 if (in_channels == 1 and (image.ndim == 2 or image.shape[2] == 3)) else (
            image.shape[2] if image.ndim == 3 else 1)
        assert (result.shape[2] if result.ndim == 3 else 1) == channels, path.name  # gray stays gray, alpha kept
        np.testing.assert_array_equal(result, expected_result(net, in_channels, scale, image), err_msg=path.name)


# ------------------------------------------------------------------------------------- the CLI on every family


@pytest.fixture(scope='module')
def light_sr_run(images: Path, checkpoints, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One ``mambair-restore`` run of random lightSR_x4 weights on the 'sr' crops: (output folder, process)."""
    weights, _ = checkpoints('lightSR_x4')
    work = tmp_path_factory.mktemp('light_sr_run')
    # a glob pattern, the default tile (auto: whole image here) and suffix (x4), and side-by-side views
    proc = run_cli('mambair-restore', str(images / 'sr' / '*.png'), '-o', 'out', '--weights', str(weights),
                   '--compare', cwd=work)
    return work / 'out', proc


def test_cli_restores_every_layout_like_the_network(light_sr_run, images: Path, checkpoints) -> None:
    """Arch inferred from the checkpoint; gray, RGB, RGBA and 16-bit inputs; --compare."""
    outdir, proc = light_sr_run
    assert proc.stderr == ''
    assert 'MambaIR (lightSR_x4), x4, 3->3 channels, 0.92 M params, cpu fp32; 4 images' in proc.stdout
    assert '4 restored, 0 skipped, 0 failed' in proc.stdout
    check_outputs(images / 'sr', outdir, 'x4', checkpoints('lightSR_x4')[1], 3, 4)
    for path in (images / 'sr').iterdir():
        result = cv2.imread(str(outdir / f'{path.stem}_x4.png'), cv2.IMREAD_UNCHANGED)
        side = cv2.imread(str(outdir / f'{path.stem}_x4_compare.png'), cv2.IMREAD_UNCHANGED)
        source = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        h, w = result.shape[:2]
        assert side.shape == (h, 2 * w, *result.shape[2:])  # input (bicubic) | output
        np.testing.assert_array_equal(side[:, w:], result)
        np.testing.assert_array_equal(side[:, :w], cv2.resize(source, (w, h), interpolation=cv2.INTER_CUBIC))


@pytest.mark.parametrize('name, folder, extra', [
    ('classicSR_x2', 'classic', ('--task', 'classicSR_x2')),
    ('colorDN_25', 'dn', ()),
    ('CAR_10', 'car', ('--task', 'CAR_10')),  # 1 channel: gray BMP, gray JPEG, and a colour PNG made gray
    ('realDN', 'real', ()),  # MambaIRUNet, sizes not multiples of 8, 8- and 16-bit
])
def test_cli_restores_like_the_network(name: str, folder: str, extra: tuple, images: Path, checkpoints,
                                       tmp_path: Path) -> None:
    weights, net = checkpoints(name)
    preset = PRESETS[name]
    outdir = tmp_path / 'out'
    proc = run_cli('mambair-restore', str(images / folder), '-o', str(outdir), '--weights', str(weights),
                   '--tile', '0', '--suffix', 'out', *extra, cwd=tmp_path)
    assert proc.stderr == ''
    assert f'mambair-restore: {preset.arch_type} (' in proc.stdout
    check_outputs(images / folder, outdir, 'out', net, preset.in_channels, preset.scale)


# ---------------------------------------------------------------------------------------- config inference


def networks() -> dict[str, list[str]]:
    """The official networks: {first preset name: all presets with that network_g} (colorDN_15/25/50 share one)."""
    groups: dict[str, list[str]] = {}
    for name, preset in PRESETS.items():
        groups.setdefault(repr(preset.network_g()), []).append(name)
    return {names[0]: names for names in groups.values()}


@pytest.mark.parametrize('name, sharing', list(networks().items()))
def test_inference_is_exact_for_every_official_config(name: str, sharing: list) -> None:
    preset = PRESETS[name]
    net = make_net(name, seed=1)
    model = load_model(net.state_dict(), device='cpu')  # (files: the CLI tests)
    assert model.arch_type == preset.arch_type
    assert shaping_args(model.arch_type, model.kwargs) == shaping_args(preset.arch_type, preset.kwargs)
    assert (model.scale, model.in_channels) == (preset.scale, preset.in_channels)
    assert list(model.presets) == sharing
    expected = net.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.net.state_dict().items())


@pytest.mark.parametrize('name', REFERENCE_FILES)
def test_inference_is_exact_for_reference_configs(name: str, reference_dir: Path) -> None:
    ref = torch.load(reference_dir / name, weights_only=True)
    model = load_model(ref['state_dict'], device='cpu')
    assert model.arch_type == ref['arch_type']
    assert shaping_args(model.arch_type, model.kwargs) == shaping_args(ref['arch_type'], ref['kwargs'])
    # img_range leaves no trace in the weights (255 in the tiny CAR reference): an option file supplies it
    network = {'type': ref['arch_type'], **ref['kwargs']}
    model = load_model(ref['state_dict'], opt={'network_g': network}, device='cpu')
    with torch.no_grad():
        assert (model(ref['input']) - ref['output']).abs().max() < 1e-4


def reference_net(reference_dir: Path, name: str) -> tuple[torch.nn.Module, dict]:
    """The official reference network ``name`` (``../shared/reference``), loaded, in eval mode, and its file."""
    ref = torch.load(reference_dir / name, weights_only=True)
    net = arch_class(ref['arch_type'])(**ref['kwargs'])
    net.load_state_dict(ref['state_dict'], strict=True)
    return net.eval(), ref


@pytest.mark.parametrize('name, folder, summary', [
    ('mambairv2_lightSR_x2.pt', 'sr',  # gray, RGB, RGBA and 16-bit inputs; the summary names the v2 preset
     'MambaIRv2Light (v2_lightSR_x2), x2, 3->3 channels, 0.77 M params, cpu fp32, deterministic routing; 4 images'),
    ('tiny_mambairv2_SR_x2.pt', 'classic', 'MambaIRv2 (custom config), x2, 3->3 channels, 0.44 M params'),
    ('tiny_mambairv2_CAR.pt', 'car', 'MambaIRv2 (custom config), x1, 1->1 channels'),
])
def test_cli_restores_v2_like_the_network(name: str, folder: str, summary: str, images: Path, reference_dir: Path,
                                          tmp_path: Path) -> None:
    """MambaIRv2 checkpoints (official weights layout): the config is inferred, the output is the network's."""
    net, ref = reference_net(reference_dir, name)
    torch.save({'params': ref['state_dict']}, tmp_path / 'v2.pth')
    outdir = tmp_path / 'out'
    proc = run_cli('mambair-restore', str(images / folder), '-o', str(outdir), '--weights', str(tmp_path / 'v2.pth'),
                   '--suffix', 'out', cwd=tmp_path)
    assert proc.stderr == ''
    assert f'mambair-restore: {summary}' in proc.stdout
    check_outputs(images / folder, outdir, 'out', net, ref['kwargs'].get('in_chans', 3), ref['kwargs']['upscale'])


@pytest.mark.parametrize('name', V2_REFERENCE_FILES)
def test_v2_references_through_load_model(name: str, reference_dir: Path) -> None:
    """Inferred config, deterministic routing by default: the official stable-sort output (spec 2.10)."""
    ref = torch.load(reference_dir / name, weights_only=True)
    model = load_model(ref['state_dict'], device='cpu')
    assert model.arch_type == ref['arch_type'] and model.routing == 'deterministic'
    assert shaping_args(model.arch_type, model.kwargs) == shaping_args(ref['arch_type'], ref['kwargs'])
    assert model.info.size_multiple == ref['kwargs']['window_size']
    with torch.no_grad():
        assert (model(ref['input']) - ref['output_stable_sort']).abs().max() < 1e-4


def test_v2_routing_choice(reference_dir: Path, checkpoints, tmp_path: Path, capsys) -> None:
    """load_model(routing=...) / --routing: 'gumbel' follows the torch seed; networks without routing refuse it."""
    ref = torch.load(reference_dir / 'tiny_mambairv2_SR_x2.pt', weights_only=True)
    x = ref['input']
    with torch.no_grad():
        deterministic = load_model(ref['state_dict'], device='cpu', routing='deterministic')(x)
        gumbel = load_model(ref['state_dict'], device='cpu', routing='gumbel')
        assert gumbel.routing == 'gumbel' and gumbel.describe().endswith('cpu fp32, gumbel routing')
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(gumbel(x))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], deterministic)
    assert (runs[0] - deterministic).abs().max() < 0.1  # the same network, other token orders
    with pytest.raises(RestoreError, match="unknown routing 'noisy' \\(use deterministic or gumbel\\)"):
        load_model(ref['state_dict'], device='cpu', routing='noisy')
    weights, _ = checkpoints('lightSR_x2')
    assert restore_cli.main(['x.png', '-o', str(tmp_path), '--weights', str(weights), '--routing', 'gumbel']) == 2
    assert "routing 'gumbel': MambaIR networks route no tokens" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ bad inputs


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('mambair-restore: error: '), stderr
    assert 'Traceback' not in stderr
    return lines[0]


def test_bad_images_do_not_stop_the_others(images: Path, checkpoints, tmp_path: Path) -> None:
    weights, _ = checkpoints('lightSR_x2')
    folder = tmp_path / 'photos'
    folder.mkdir()
    for name in ('baby.png', 'leaves.png'):
        (folder / name).write_bytes((images / 'sr' / name).read_bytes())
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4)  # a PNG header, then garbage
    (folder / 'empty.jpg').write_bytes(b'')
    proc = run_cli('mambair-restore', str(folder), str(tmp_path / 'missing.png'), str(tmp_path / 'none*.png'),
                   '-o', 'out', '--weights', str(weights), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    errors = sorted(line for line in proc.stderr.splitlines() if line.strip())
    assert errors == sorted([
        f'mambair-restore: error: cannot decode image: not an image file, truncated, or a format OpenCV cannot '
        f'read ({folder / name})' for name in ('broken.png', 'empty.jpg')] + [
        f'mambair-restore: error: no such file or folder ({tmp_path / "missing.png"})',
        f'mambair-restore: error: no files match this pattern ({tmp_path / "none*.png"})',
    ]), proc.stderr
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['baby_x2.png', 'leaves_x2.png']
    assert '2 restored, 0 skipped, 4 failed' in proc.stdout


def test_existing_outputs_are_kept_unless_overwrite(images: Path, checkpoints, tmp_path: Path, capsys) -> None:
    weights, _ = checkpoints('lightSR_x2')
    args = [str(images / 'sr' / 'baby.png'), '-o', str(tmp_path), '--weights', str(weights), '--quiet']
    target = tmp_path / 'baby_x2.png'
    target.write_bytes(b'mine')
    assert restore_cli.main(args) == 0
    err = capsys.readouterr().err.strip()
    assert err == f'mambair-restore: skipped: {target} exists (use --overwrite to replace it) ' \
                  f'({images / "sr" / "baby.png"})'
    assert target.read_bytes() == b'mine'
    assert restore_cli.main([*args, '--overwrite']) == 0
    assert cv2.imread(str(target)).shape == (40, 56, 3)


def test_pickled_code_is_refused(tmp_path: Path, capsys) -> None:
    torch.save({'params': {'w': torch.zeros(1)}, 'hook': subprocess.Popen}, tmp_path / 'evil.pth')
    assert restore_cli.main([str(tmp_path), '-o', str(tmp_path / 'out'), '--weights', str(tmp_path / 'evil.pth')]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f'refusing to load {tmp_path / "evil.pth"}' in line and 'arbitrary code' in line
    assert not (tmp_path / 'out').exists()


def test_checkpoint_of_another_model_names_the_closest_preset(tmp_path: Path, capsys) -> None:
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 3, 3))
    torch.save(other.state_dict(), tmp_path / 'other.pth')
    assert restore_cli.main(['x.png', '-o', str(tmp_path), '--weights', str(tmp_path / 'other.pth')]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert 'not a MambaIR-family state dict (first keys: 0.weight, 0.bias, 2.weight, 2.bias)' in line
    assert 'closest official preset: ' in line and 'missing (' in line and 'unexpected (4): 0.weight' in line


def test_inconsistent_checkpoint_names_keys_and_preset(checkpoints, tmp_path: Path) -> None:
    _, net = checkpoints('lightSR_x2')
    state = dict(net.state_dict())
    key = 'layers.2.residual_group.blocks.3.self_attention.A_logs'
    state[key] = torch.zeros(288, 16)  # d_state 16 in one block: no MambaIR looks like this
    with pytest.raises(CheckpointError) as info:
        load_model(state, device='cpu')
    message = str(info.value)
    assert 'cannot infer the MambaIR config: layers.2.residual_group.blocks.3.self_attention.x_proj_weight' in message
    assert ('closest official preset: lightSR_x2 (MambaIR; 713 of its 714 keys agree); wrongly shaped '
            f'(1; checkpoint vs preset): {key} (288, 16) vs (288, 10)') in message


def test_inconsistent_v2_checkpoint_names_keys_and_preset(reference_dir: Path) -> None:
    state = dict(torch.load(reference_dir / 'mambairv2_lightSR_x2.pt', weights_only=True)['state_dict'])
    key = 'layers.3.residual_group.layers.4.assm.selectiveScan.A_logs'
    state[key] = torch.zeros(48, 16)
    with pytest.raises(CheckpointError) as info:
        load_model(state, device='cpu')
    assert str(info.value) == (
        f'cannot infer the MambaIRv2Light config: {key} has shape (48, 16), expected (48, 8) for embed_dim 48, '
        'hidden 48, d_state 8, inner_rank 32, num_tokens 64; closest official preset: v2_lightSR_x2 (MambaIRv2Light; '
        f'1018 of its 1019 keys agree); wrongly shaped (1; checkpoint vs preset): {key} (48, 16) vs (48, 8)')


def test_task_of_another_config_gives_the_load_checked_message(checkpoints, tmp_path: Path, capsys) -> None:
    weights, _ = checkpoints('lightSR_x2')
    assert restore_cli.main(['x.png', '-o', str(tmp_path), '--weights', str(weights), '--task', 'lightSR_x4']) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f'{weights} does not fit the MambaIR network: config: upscale: 2 in checkpoint, 4 in network options' \
        in line
    assert 'wrongly shaped keys (2): upsample.0.weight (12, 60, 3, 3) in checkpoint vs (48, 60, 3, 3)' in line


@pytest.mark.parametrize('args, message', [
    (['--task', 'SR_x5'], "unknown MambaIR task preset 'SR_x5'; known: classicSR_x2"),
    (['--half', '--device', 'cpu'], 'half precision (--half) needs a CUDA device'),
    (['--device', 'tpu'], "unknown device 'tpu'"),
    (['--weights', 'nothere.pth'], 'checkpoint not found: nothere.pth'),
])
def test_setup_errors_exit_2_with_one_line(args: list, message: str, checkpoints, tmp_path: Path, capsys) -> None:
    weights, _ = checkpoints('lightSR_x2')
    assert restore_cli.main(['x.png', '-o', str(tmp_path), '--weights', str(weights), *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_cuda_device_without_gpu_is_a_clear_error(checkpoints, tmp_path: Path, capsys) -> None:
    weights, _ = checkpoints('lightSR_x2')
    status = restore_cli.main(['x.png', '-o', str(tmp_path), '--weights', str(weights), '--device', 'cuda'])
    if torch.cuda.is_available():  # with a GPU the run goes on to the (missing) input
        assert status == 1
    else:
        assert status == 2
        assert 'torch.cuda.is_available() is False' in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize('tile, expected', [
    ('0', 'out of memory on cpu on the whole 28x20 image; try --tile 8'),
    ('16', 'out of memory on cpu with tile 16; try --tile 8'),
])
def test_out_of_memory_suggests_a_tile_and_goes_on(tile: str, expected: str, images: Path, checkpoints,
                                                   tmp_path: Path, monkeypatch, capsys) -> None:
    weights, _ = checkpoints('lightSR_x2')
    net_class = arch_class('MambaIR')
    forward = net_class.forward

    def limited(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] * x.shape[-2] > 200:  # baby.png (20x28) and its 16x16 tiles are 'too large'
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
        return forward(self, x)

    monkeypatch.setattr(net_class, 'forward', limited)
    small = tmp_path / 'small.png'
    cv2.imwrite(str(small), cv2.imread(str(images / 'sr' / 'baby.png'))[:12, :10])
    args = [str(images / 'sr' / 'baby.png'), str(small), '-o', str(tmp_path / 'out'), '--weights', str(weights),
            '--tile', tile, '--tile-overlap', '4', '--quiet']
    assert restore_cli.main(args) == 1
    assert one_error_line(capsys.readouterr().err) == \
        f'mambair-restore: error: {expected} ({images / "sr" / "baby.png"})'
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['small_x2.png']


# ------------------------------------------------------------------------------------------------ Python API


def test_api_on_numpy_and_pil_equals_the_cli(light_sr_run, images: Path, checkpoints) -> None:
    from PIL import Image

    outdir, _ = light_sr_run
    model = load_model(checkpoints('lightSR_x4')[0], device='cpu')
    assert (model.scale, model.presets, model.task) == (4, ('lightSR_x4',), None)
    for name in ('baby', 'leaves', 'bridge', 'mcmaster16'):
        cli = cv2.imread(str(outdir / f'{name}_x4.png'), cv2.IMREAD_UNCHANGED)
        source = cv2.imread(str(images / 'sr' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(restore(model, source, bgr=True), cli)
        rgb = cv2.cvtColor(source, cv2.COLOR_BGRA2RGBA if source.ndim == 3 and source.shape[2] == 4
                           else cv2.COLOR_BGR2RGB) if source.ndim == 3 else source
        expected_rgb = cv2.cvtColor(cli, cv2.COLOR_BGRA2RGBA if cli.ndim == 3 and cli.shape[2] == 4
                                    else cv2.COLOR_BGR2RGB) if cli.ndim == 3 else cli
        np.testing.assert_array_equal(restore(model, rgb), expected_rgb)
        if source.dtype == np.uint8:  # PIL has no 16-bit colour mode
            pil = restore(model, Image.fromarray(rgb))
            assert isinstance(pil, Image.Image)
            assert pil.mode == ('L' if rgb.ndim == 2 else {3: 'RGB', 4: 'RGBA'}[rgb.shape[2]])
            np.testing.assert_array_equal(np.asarray(pil), expected_rgb)
    photo = Image.open(images / 'sr' / 'baby.png')
    for mode, out_mode in (('LA', 'LA'), ('P', 'RGB')):  # gray + alpha kept; a palette image becomes RGB
        result = restore(model, photo.convert(mode))
        assert (result.mode, result.size) == (out_mode, (photo.width * 4, photo.height * 4))
    gray16 = cv2.imread(str(images / 'real' / 'sidd1_16bit.png'), cv2.IMREAD_UNCHANGED)[..., 1]
    pil16 = restore(model, Image.fromarray(gray16))
    assert pil16.mode == 'I;16' and pil16.size == (gray16.shape[1] * 4, gray16.shape[0] * 4)
    np.testing.assert_array_equal(np.asarray(pil16), restore(model, gray16))


def test_float_input_gives_float_output(checkpoints) -> None:
    _, net = checkpoints('lightSR_x2')
    model = load_model(net.state_dict(), device='cpu')
    image = np.random.default_rng(0).random((12, 10, 3), dtype=np.float32)
    result = restore(model, image, tile=0)
    assert result.dtype == np.float32 and result.shape == (24, 20, 3)
    np.testing.assert_array_equal(result, network_output(net, image))


@pytest.mark.parametrize('family', ['MambaIR', 'MambaIRv2'])
def test_bf16_on_the_cpu_keeps_the_scan_in_float32(family: str, checkpoints, images: Path, reference_dir: Path,
                                                   monkeypatch) -> None:
    """MambaIR: random lightSR_x2 weights; MambaIRv2: the light-SR x2 reference weights (the attention and the
    routing in bfloat16 too: a route that flips re-sorts tokens, the output stays close)."""
    from basicsr_mambair.archs import assm, ss2d

    if family == 'MambaIR':
        state, module = checkpoints('lightSR_x2')[1].state_dict(), ss2d
    else:
        state, module = reference_net(reference_dir, 'mambairv2_lightSR_x2.pt')[1]['state_dict'], assm
    image = cv2.imread(str(images / 'sr' / 'baby.png'))
    full = restore(load_model(state, device='cpu'), image, bgr=True)
    dtypes = set()

    def recording(scan):
        def call(u: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            dtypes.add(u.dtype)
            return scan(u, *args, **kwargs)
        return call

    for name in ('selective_scan', 'scan_cross', 'scan_permuted'):  # unfused, fused (v1 and v2)
        if hasattr(module, name):
            monkeypatch.setattr(module, name, recording(getattr(module, name)))
    half = restore(load_model(state, device='cpu', precision='bf16'), image, bgr=True)
    assert dtypes == {torch.float32}
    assert half.dtype == np.uint8 and half.shape == full.shape
    mse = np.mean((half.astype(float) - full.astype(float)) ** 2)
    assert 0 < mse and 10 * np.log10(255 ** 2 / mse) > 35, mse  # bf16 elsewhere: close, not equal


def test_option_file_builds_its_network_g(checkpoints, images: Path, tmp_path: Path, capsys) -> None:
    import yaml

    weights, net = checkpoints('lightSR_x2')
    opt = {'name': 'mine', 'scale': 2, 'network_g': PRESETS['lightSR_x2'].network_g()}
    (tmp_path / 'mine.yml').write_text(yaml.safe_dump(opt))
    args = [str(images / 'sr' / 'bridge.png'), '-o', str(tmp_path / 'out'), '--weights', str(weights), '--quiet']
    assert restore_cli.main([*args, '--opt', str(tmp_path / 'mine.yml')]) == 0
    result = cv2.imread(str(tmp_path / 'out' / 'bridge_x2.png'), cv2.IMREAD_UNCHANGED)
    source = cv2.imread(str(images / 'sr' / 'bridge.png'), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(result, expected_result(net, 3, 2, source))
    opt['scale'] = 4
    (tmp_path / 'mine.yml').write_text(yaml.safe_dump(opt))
    assert restore_cli.main([*args, '--opt', str(tmp_path / 'mine.yml'), '--overwrite']) == 2
    assert 'the options say scale 4, but their network_g upscales by 2' in one_error_line(capsys.readouterr().err)


def test_outputs_in_the_input_folder_are_not_inputs(checkpoints, images: Path, tmp_path: Path, capsys) -> None:
    weights, _ = checkpoints('lightSR_x2')
    small = cv2.imread(str(images / 'sr' / 'baby.png'))[:10, :12]
    cv2.imwrite(str(tmp_path / 'a.png'), small)
    cv2.imwrite(str(tmp_path / 'a.bmp'), small)  # same stem: its output name is taken
    args = [str(tmp_path), '-o', str(tmp_path), '--weights', str(weights), '--quiet']
    assert restore_cli.main(args) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f'mambair-restore: error: a_x2.png was already written from {tmp_path / "a.bmp"} in this run '
        f'({tmp_path / "a.png"})')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.bmp', 'a.png', 'a_x2.png']
    assert restore_cli.main([*args, '--overwrite']) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.bmp', 'a.png', 'a_x2.png']  # no a_x2_x2.png


def test_tiled_restore_is_close_to_the_whole_image(checkpoints, images: Path) -> None:
    _, net = checkpoints('lightSR_x2')
    model = load_model(net.state_dict(), task='lightSR_x2', device='cpu')
    image = cv2.imread(str(images / 'real' / 'sidd0.png'))  # 36x44
    whole = restore(model, image, tile=0, bgr=True)
    calls = []
    tiled = restore(model, image, tile=24, tile_overlap=8, bgr=True, progress=lambda d, t: calls.append((d, t)))
    assert tiled.shape == whole.shape == (72, 88, 3)
    assert calls == [(k, 6) for k in range(1, 7)]  # rows start at 0, 12; columns at 0, 16, 20
    # random weights and a global scan: tiles see less context, so the result differs a little
    mse = np.mean((tiled.astype(float) - whole.astype(float)) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) > 30, mse
    np.testing.assert_array_equal(restore(model, image, tile=44, bgr=True), whole)  # tile >= image: exact


def test_forward_tiled_progress_is_optional() -> None:
    net = torch.nn.Upsample(scale_factor=2)
    x = torch.rand(1, 3, 10, 12)
    calls = []
    out = forward_tiled(net, x, 2, 6, 2, tile_batch=2, progress=lambda d, t: calls.append((d, t)))
    assert torch.allclose(out, forward_tiled(net, x, 2, 6, 2, tile_batch=2))
    assert calls == [(2, 6), (4, 6), (6, 6)]


# ------------------------------------------------------------------------------------------- automatic tiles


@pytest.mark.parametrize('backend', ['auto', 'torch'])
@pytest.mark.parametrize('name', ['lightSR_x2', 'realDN', 'v2_lightSR_x2'])
def test_memory_estimate_bounds_the_measured_peak(name: str, backend: str) -> None:
    """Per pixel, the estimate is between 1x and 2x the measured growth of the peak; the fixed part is covered.
    With the fused CPU scan (auto, where the kernel builds) and without it (torch)."""
    preset = PRESETS[name]
    net = make_net(name)
    small, large = 48, 96
    with scan_backend(backend):
        peaks = {side: measure_peak_bytes(net, preset.in_channels, side) for side in (small, large)}
        fused = uses_fused_kernel(torch.device('cpu'), torch.float32)
        estimate = bytes_per_pixel(describe(preset.arch_type, preset.kwargs), torch.device('cpu'))
    assert fused == (backend == 'auto' and compiled.unavailable_reason() is None)
    per_pixel = (peaks[large] - peaks[small]) / (large ** 2 - small ** 2)
    assert per_pixel <= estimate <= 2 * per_pixel, (per_pixel, estimate)
    assert peaks[small] - per_pixel * small ** 2 <= FIXED_BYTES  # scan work buffers and the like


def test_choose_tile_fits_the_memory(checkpoints) -> None:
    _, net = checkpoints('lightSR_x2')
    model = load_model(net.state_dict(), device='cpu')
    fused = uses_fused_kernel(model.device, torch.float32)
    per_pixel = bytes_per_pixel(model.info, model.device)
    assert per_pixel == (BYTES_PER_INNER_CHANNEL_FUSED if fused else BYTES_PER_INNER_CHANNEL) * 72 + 4 * 4 * 2 * 3
    assert choose_tile(model.info, model.device, 500, 400, available=64 << 30) == 0  # fits: whole image
    tile = choose_tile(model.info, model.device, 2000, 3000, available=4 << 30)
    assert tile % 8 == 0 and 64 <= tile < 2000
    image_buffers = 4 * 2000 * 3000 * (2 * 3 + 3 * 4 * 4)
    assert FIXED_BYTES + image_buffers + tile ** 2 * per_pixel <= 0.5 * (4 << 30)
    assert FIXED_BYTES + image_buffers + (tile + 8) ** 2 * per_pixel > 0.5 * (4 << 30)
    tile = choose_tile(model.info, model.device, 2000, 3000, overlap=32, available=1 << 20)
    assert tile == 64  # never below 2 x overlap


def test_choose_tile_takes_multiples_of_the_v2_window(reference_dir: Path) -> None:
    ref = torch.load(reference_dir / 'mambairv2_lightSR_x2.pt', weights_only=True)
    model = load_model(ref['state_dict'], device='cpu')
    assert model.info.size_multiple == 16
    sides = [choose_tile(model.info, model.device, 600, 800, overlap=20, available=mib << 20)
             for mib in (8, 400, 800, 1600, 3200)]
    assert sides[0] == 48  # the least tile, 2 x overlap, rounded up to the window
    assert all(side % 16 == 0 for side in sides) and sides == sorted(set(sides)) and sides[-1] < 600, sides


def test_oom_error_is_raised_by_the_api(checkpoints, monkeypatch) -> None:
    _, net = checkpoints('lightSR_x2')
    model = load_model(net.state_dict(), device='cpu')

    def no_memory(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(model, 'net', no_memory)
    with pytest.raises(OutOfMemory) as info:
        restore(model, np.zeros((40, 30, 3), np.uint8), tile=0)
    assert info.value.suggested_tile == 16 and 'try --tile 16' in str(info.value)


# ----------------------------------------------------------------------------------------------- packaging


def test_help_and_lazy_exports(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        restore_cli.main(['--help'])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ('--weights', '--task', '--opt', '--tile', '--tile-overlap', '--device', '--half', '--bf16',
                 '--compare', '--overwrite', '--routing', 'deterministic', 'gumbel', 'realDN', 'CAR_40',
                 'v2_lightSR_x2', 'v2_classicSR_Large_x4', 'v2_CAR_40'):
        assert flag in out
    # `import basicsr_mambair` does not import them (test_cli checks the modules it imports); first use does
    from basicsr_mambair import api

    assert basicsr_mambair.load_model is api.load_model and basicsr_mambair.restore is api.restore
    with pytest.raises(AttributeError, match='no attribute'):
        basicsr_mambair.restoring  # noqa: B018
