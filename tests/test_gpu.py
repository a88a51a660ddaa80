"""CUDA code paths: the scan's dispatch and exactness, the official outputs, restoring, training and DDP
(nccl) on a GPU. They run where PyTorch sees a CUDA GPU; CI has none, so there they are skipped."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REFERENCE_FILES, REPO, arch_class, assert_close, cli_env, run_cli, scan_with_grads

import basicsr_mambair  # noqa: F401  (registers the archs)
from basicsr_mambair.api import load_model, restore
from basicsr_mambair.memory import available_memory
from basicsr_mambair.ops import scan as ss
from basicsr_mambair.ops.scan import get_backend, scan_backend, selective_scan, selective_scan_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


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


@pytest.mark.parametrize('length', [1, 7, 1000])
def test_auto_scan_on_cuda_matches_float64_reference(length):
    """auto on CUDA tensors: mamba_ssm's kernel where it imports, else the torch backend on the GPU;
    outputs and all gradients to 1e-5 of the float64 evaluation (on the CPU)."""
    ss.reset()
    backend = get_backend('cuda')
    assert backend == ('cuda' if ss.cuda.unavailable_reason() is None else 'torch')
    t = scan_inputs(length, 'cuda', seed=length)
    y, last, grads = scan_with_grads(selective_scan, t)
    assert y.is_cuda and all(g.is_cuda for g in grads.values())
    y64, last64, grads64 = scan_with_grads(selective_scan_reference, {k: v.cpu().double() for k, v in t.items()})
    assert_close(y.cpu(), y64, name='y')
    assert_close(last.cpu(), last64, name='last state')
    for k in grads64:
        assert_close(grads[k].cpu(), grads64[k], name=f'd{k}')


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


@pytest.mark.parametrize('name', REFERENCE_FILES)
def test_official_outputs_on_cuda(reference_dir: Path, name: str, exact_cuda) -> None:
    ref = torch.load(reference_dir / name, map_location='cpu', weights_only=True)
    model = arch_class(ref['arch_type'])(**ref['kwargs'])
    model.load_state_dict(ref['state_dict'], strict=True)
    model.eval().cuda()
    with torch.no_grad(), scan_backend('torch'):
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


def test_training_steps_on_cuda_match_the_cpu(exact_cuda) -> None:
    """One forward and backward of a tiny MambaIR: the GPU's loss and gradients equal the CPU's."""
    net = arch_class('MambaIR')(upscale=2, embed_dim=30, depths=[1], d_state=8, mlp_ratio=1.5, img_size=16)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = {}
    for device in ('cpu', 'cuda'):
        model = net.to(device)
        model.zero_grad()
        loss = model(x.to(device)).square().mean()
        loss.backward()
        grads[device] = (loss.item(), {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters()})
    assert abs(grads['cpu'][0] - grads['cuda'][0]) <= 1e-5 * abs(grads['cpu'][0])
    for k, g in grads['cpu'][1].items():
        assert_close(grads['cuda'][1][k], g, rtol=1e-4, name=k)


def test_ddp_with_nccl_on_one_gpu(tmp_path: Path) -> None:
    """BasicSR's pipeline under torchrun on the GPU: nccl, DistributedDataParallel with device_ids."""
    from test_cli import TINY_NETWORK, _free_port
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
