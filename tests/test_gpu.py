"""CUDA code paths: the scan's dispatch and exactness (``mamba_ssm`` where it imports, our Triton kernels, the
PyTorch scan), the official outputs through each, restoring, training (float32 and mixed precision, eager and
compiled) and DDP (nccl) on a GPU. They run where PyTorch sees a CUDA GPU; CI has none, so there they are
skipped (``benchmarks/gpu_check.sh`` runs them on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REFERENCE_FILES, REPO, arch_class, assert_close, cli_env, run_cli, scan_with_grads
from tiny_experiments import TINY_NETWORK

import basicsr_mambair  # noqa: F401  (registers the archs)
from basicsr_mambair.api import load_model, restore
from basicsr_mambair.memory import available_memory
from basicsr_mambair.ops import scan as ss
from basicsr_mambair.ops.scan import get_backend, scan_backend, selective_scan, selective_scan_reference
from basicsr_mambair.utils.amp import MixedPrecision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
HAS_MAMBA = torch.cuda.is_available() and ss.cuda.unavailable_reason() is None
# the GPU backends this machine has: the official kernel where it imports, ours (Triton), the PyTorch scan
GPU_BACKENDS = (['cuda'] if HAS_MAMBA else []) + ['triton', 'torch']


@pytest.fixture
def exact_cuda():
    """No TF32 in cuDNN convolutions and matmuls: float32 results comparable with the CPU's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def scan_inputs(length: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, dim, n, groups = 2, 48, 16, 4
    t = {'u': torch.randn(batch, dim, length, generator=g), 'delta': torch.randn(batch, dim, length, generator=g),
         'A': -torch.rand(dim, n, generator=g) * 4, 'B': torch.randn(batch, groups, n, length, generator=g),
         'C': torch.randn(batch, groups, n, length, generator=g), 'D': torch.randn(dim, generator=g),
         'z': torch.randn(batch, dim, length, generator=g), 'delta_bias': torch.randn(dim, generator=g) - 1}
    return {k: v.to(device) for k, v in t.items()}


def test_auto_picks_mamba_ssm_else_triton():
    ss.reset()
    assert ss.triton.unavailable_reason() is None, ss.triton.unavailable_reason()  # compiles and self-checks
    assert get_backend('cuda') == ('cuda' if HAS_MAMBA else 'triton')


_REFERENCE64: dict = {}


@pytest.mark.parametrize('backend', GPU_BACKENDS + ['auto'])
@pytest.mark.parametrize('length', [1, 7, 1000, 4099])
def test_scan_on_cuda_matches_float64_reference(backend, length):
    """Every GPU backend (and auto's pick): outputs and all gradients to 1e-5 of the float64 evaluation (on the
    CPU), with D, z, delta bias, softplus and the last state; 4099 steps end inside a tile and, for triton on
    a large GPU, cross time chunks."""
    t = scan_inputs(length, 'cuda', seed=length)
    y, last, grads = scan_with_grads(lambda *a, **k: selective_scan(*a, backend=backend, **k), t)
    assert y.is_cuda and all(g.is_cuda for g in grads.values())
    if length not in _REFERENCE64:  # the float64 loop once per length, for all backends
        _REFERENCE64[length] = scan_with_grads(selective_scan_reference, {k: v.cpu().double() for k, v in t.items()})
    y64, last64, grads64 = _REFERENCE64[length]
    assert_close(y.cpu(), y64, name='y')
    assert_close(last.cpu(), last64, name='last state')
    for k in grads64:
        assert_close(grads[k].cpu(), grads64[k], name=f'd{k}')


@pytest.mark.parametrize('chunks', [1, 3])
def test_triton_inference_at_mambair_shapes(chunks, monkeypatch):
    """The inference forward at a light-SR shape (batch 1, 4 directions x 120 channels, N 16, a 48 x 40
    image) with B and C as strided slices of one projection, as SS2D passes them; with and without time
    chunks: the float64 evaluation to 1e-5."""
    monkeypatch.setattr(ss.triton, 'FORCE_CHUNKS', chunks)
    g = torch.Generator().manual_seed(chunks)
    b, dim, n, length = 1, 480, 16, 48 * 40
    proj = torch.randn(b, 4, 4 + 2 * n, length, generator=g)
    t = {'u': torch.randn(b, dim, length, generator=g), 'delta': torch.randn(b, dim, length, generator=g) - 1,
         'A': -torch.arange(1, n + 1.0).repeat(dim, 1), 'B': proj[:, :, 4:4 + n], 'C': proj[:, :, 4 + n:],
         'D': torch.ones(dim), 'delta_bias': torch.rand(dim, generator=g) - 4}
    args = [t[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D')]
    with torch.no_grad():
        y = selective_scan(*(a.cuda() for a in args), delta_bias=t['delta_bias'].cuda(), delta_softplus=True,
                           backend='triton')
    y64 = selective_scan_reference(*(a.double() for a in args), delta_bias=t['delta_bias'].double(),
                                   delta_softplus=True)
    assert_close(y.cpu(), y64, name='y')


def test_compiled_request_with_cuda_tensors_falls_back_with_one_warning():
    ss.reset()
    t = scan_inputs(30, 'cuda')
    args = [t[k] for k in ('u', 'delta', 'A', 'B', 'C')]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter('always')
        y1 = selective_scan(*args, backend='compiled')
        y2 = selective_scan(*args, backend='compiled')
    assert len([w for w in caught if 'needs CPU tensors' in str(w.message)]) == 1
    assert y1.is_cuda and torch.equal(y1, y2) and torch.equal(y1, selective_scan(*args, backend='torch'))


@pytest.mark.parametrize('backend', GPU_BACKENDS)
@pytest.mark.parametrize('name', REFERENCE_FILES)
def test_official_outputs_on_cuda(reference_dir: Path, name: str, backend: str, exact_cuda) -> None:
    ref = torch.load(reference_dir / name, map_location='cpu', weights_only=True)
    model = arch_class(ref['arch_type'])(**ref['kwargs'])
    model.load_state_dict(ref['state_dict'], strict=True)
    model.eval().cuda()
    with torch.no_grad(), scan_backend(backend):
        out = model(ref['input'].cuda())
    assert out.is_cuda and (out.cpu() - ref['output']).abs().max().item() < 1e-4


@pytest.mark.parametrize('name', ['mambair_lightSR_x2.pt', 'mambairv2_lightSR_x2.pt'])
def test_restore_on_cuda_in_every_precision(reference_dir: Path, name: str, exact_cuda) -> None:
    """load_model / restore on the GPU: float32 equals the CPU result; fp16 and bf16 autocast stay close;
    tile 'auto' plans from the GPU's free memory; small tiles give the same size."""
    ref = torch.load(reference_dir / name, map_location='cpu', weights_only=True)
    image = (ref['input'][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cpu = restore(load_model(ref['state_dict'], device='cpu'), image, tile=None).astype(np.float64)
    assert available_memory(torch.device('cuda')) > 0
    for precision, max_diff in (('fp32', 1), ('fp16', 4), ('bf16', 8)):
        model = load_model(ref['state_dict'], device='cuda', precision=precision)
        out = restore(model, image, tile='auto').astype(np.float64)
        assert out.shape == cpu.shape
        psnr = 10 * np.log10(255 ** 2 / max(np.mean((out - cpu) ** 2), 1e-10))
        assert np.abs(out - cpu).max() <= max_diff or psnr > 40, (precision, psnr)
    tiled = restore(load_model(ref['state_dict'], device='cuda'), image, tile=16, tile_overlap=4)
    assert tiled.shape == cpu.shape


def test_restore_cli_on_cuda_with_half(tmp_path: Path, reference_dir: Path) -> None:
    ref = torch.load(reference_dir / 'mambair_lightSR_x2.pt', map_location='cpu', weights_only=True)
    torch.save({'params': ref['state_dict']}, tmp_path / 'light.pth')
    import cv2

    image = (ref['input'][0].permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'in.png'), image)
    run_cli('mambair-restore', 'in.png', '-o', 'out', '--weights', 'light.pth', '--device', 'cuda', '--half',
            cwd=tmp_path)
    out = cv2.imread(str(tmp_path / 'out' / 'in_x2.png'))
    assert out.shape == (image.shape[0] * 2, image.shape[1] * 2, 3)


@pytest.mark.parametrize('backend', GPU_BACKENDS)
def test_training_steps_on_cuda_match_the_cpu(backend, exact_cuda) -> None:
    """One forward and backward of a tiny MambaIR: the GPU's loss and gradients equal the CPU's."""
    net = arch_class('MambaIR')(upscale=2, embed_dim=30, depths=[1], d_state=8, mlp_ratio=1.5, img_size=16)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = {}
    for device in ('cpu', 'cuda'):
        model = net.to(device)
        model.zero_grad()
        with scan_backend(backend if device == 'cuda' else 'auto'):
            loss = model(x.to(device)).square().mean()
            loss.backward()
        grads[device] = (loss.item(), {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters()})
    assert abs(grads['cpu'][0] - grads['cuda'][0]) <= 1e-5 * abs(grads['cpu'][0])
    for k, g in grads['cpu'][1].items():
        assert_close(grads['cuda'][1][k], g, rtol=1e-4, name=k)


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_training_on_cuda(precision: str) -> None:
    """Steps of a tiny MambaIR under autocast (fp16 with its GradScaler): the loss falls as in float32, the
    scan gets float32 inputs, the parameters stay float32."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_NETWORK.items() if k != 'type'}
    x = torch.rand(4, 3, 16, 16, device='cuda')
    target = torch.nn.functional.interpolate(x, scale_factor=2, mode='bicubic')
    losses = {}
    for mode in (None, precision):
        torch.manual_seed(0)
        net = arch_class('MambaIR')(**kwargs).cuda()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        amp = MixedPrecision(mode, 'cuda')
        assert (amp.scaler is not None) == (mode == 'fp16')
        losses[mode] = []
        for _ in range(30):
            optimizer.zero_grad()
            with amp.autocast():
                out = net(x)
            loss = (out.float() - target).abs().mean()
            amp.backward(loss)
            amp.unscale(optimizer)
            amp.step(optimizer)
            losses[mode].append(loss.item())
        assert all(p.dtype == torch.float32 for p in net.parameters())
    first, last = losses[precision][0], sum(losses[precision][-5:]) / 5
    assert last < 0.7 * first and abs(last - sum(losses[None][-5:]) / 5) < 0.1 * first, losses


def test_compiled_network_on_cuda_equals_eager(exact_cuda) -> None:
    """inductor on the GPU (Triton code generation around our scan op): a training step's output and
    gradients as in eager mode."""
    torch.manual_seed(0)
    net = arch_class('MambaIR')(**{k: v for k, v in TINY_NETWORK.items() if k != 'type'}).cuda()
    x = torch.rand(2, 3, 16, 16, device='cuda')
    results = []
    for model in (net, torch.compile(net, fullgraph=True)):
        net.zero_grad()
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for k, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], g, rtol=1e-3, atol=1e-5, msg=k)


def test_ddp_with_nccl_on_one_gpu(tmp_path: Path) -> None:
    """BasicSR's pipeline under torchrun on the GPU: nccl, DistributedDataParallel with device_ids."""
    from test_cli import _free_port
    from tiny_experiments import make_sr_pairs, sr_train_options, write_options

    hr, lr = make_sr_pairs(tmp_path / 'data')
    opt_file = write_options(tmp_path / 'train.yml',
                             sr_train_options('ddp', hr, lr, TINY_NETWORK, total_iter=4, save_freq=4, val_freq=4))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=1', f'--master_port={_free_port()}',
           str(REPO / 'basicsr_mambair' / 'train.py'), '-opt', str(opt_file), '--launcher', 'pytorch']
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = next((tmp_path / 'experiments' / 'ddp').glob('train_ddp_*.log')).read_text()
    assert 'End of training' in log and 'DistributedDataParallel' in log and 'World size (gpu number): 1' in log
