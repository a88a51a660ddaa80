"""Training faster without changing results: mixed precision (``train:use_amp``) and ``torch.compile``
(``network_g:compile``, the scan as one custom op) on the CPU with tiny networks."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import arch_class, run_cli
from test_cli import _error_line
from tiny_experiments import TINY_NETWORK, make_sr_pairs, sr_train_options, write_options

from basicsr_mambair.api import load_model
from basicsr_mambair.ops.scan import op, scan_backend, selective_scan
from basicsr_mambair.utils.amp import MixedPrecision, amp_dtype


@pytest.fixture(scope='module')
def sr_data(tmp_path_factory):
    return make_sr_pairs(tmp_path_factory.mktemp('sr_data'))


def logged_losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r'l_pix: ([0-9.e+-]+)', log)]


# ------------------------------------------------------------------------------------------------
# mixed precision
# ------------------------------------------------------------------------------------------------
def test_bf16_training_run_learns_and_saves_float32(tmp_path, sr_data):
    """mambair-train with use_amp: bf16 on real photos: the loss falls, checkpoints stay float32."""
    hr, lr = sr_data
    opt = sr_train_options('amp', hr, lr, TINY_NETWORK, total_iter=40, save_freq=40, val_freq=1000)
    opt['train']['use_amp'] = 'bf16'
    opt['train']['optim_g']['lr'] = 1e-3
    run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'amp.yml', opt)), cwd=tmp_path)
    exp = tmp_path / 'experiments' / 'amp'
    log = next(exp.glob('train_amp_*.log')).read_text()
    assert 'Mixed-precision training: bf16 autocast' in log
    losses = logged_losses(log)
    assert len(losses) == 8 and all(0 < v < 1 for v in losses), losses
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    params = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert {v.dtype for v in params.values()} == {torch.float32}


def test_bad_use_amp_gives_one_clear_line(tmp_path, sr_data):
    hr, lr = sr_data
    opt = sr_train_options('bad_amp', hr, lr, TINY_NETWORK)
    opt['train']['use_amp'] = 'fp16'
    opt['num_gpu'] = 0
    line = _error_line(run_cli('mambair-train', '-opt', str(write_options(tmp_path / 'fp16.yml', opt)),
                               cwd=tmp_path, check=False))
    assert line.endswith('train:use_amp: fp16 needs a CUDA GPU (training runs on cpu); use bf16 there'), line
    assert not (tmp_path / 'experiments').exists()
    for value in ('fp8', True, ['bf16']):
        with pytest.raises(ValueError, match=re.escape(f'train:use_amp must be bf16, fp16 or false, not {value!r}')):
            amp_dtype(value, 'cpu')


def test_mixed_precision_step_is_autocast_and_float32_losses():
    """MixedPrecision's bf16 step is autocast around the forward, float32 losses and a plain optimizer step
    (bit for bit); off, it is the float32 step; fp16 would need a GradScaler and CUDA."""
    assert amp_dtype(None, 'cpu') is None and amp_dtype(False, 'cpu') is None and amp_dtype('FP32', 'cpu') is None
    assert amp_dtype(' bf16', 'cpu') == torch.bfloat16
    kwargs = {k: v for k, v in TINY_NETWORK.items() if k != 'type'}
    net = arch_class('MambaIR')(**kwargs)
    x, target = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 24, 24)
    results = {}
    for variant in ('amp', 'by hand', 'fp32'):
        model = arch_class('MambaIR')(**kwargs)
        model.load_state_dict(net.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        if variant == 'by hand':
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = model(x)
            (out.float() - target).abs().mean().backward()
            optimizer.step()
        else:
            amp = MixedPrecision('bf16' if variant == 'amp' else None, 'cpu')
            assert amp.scaler is None and amp.name == ('bf16' if variant == 'amp' else 'fp32')
            with amp.autocast():
                out = model(x)
            amp.backward((out.float() - target).abs().mean())
            amp.unscale(optimizer)
            amp.step(optimizer)
        results[variant] = model.state_dict()
    for k, v in results['amp'].items():
        assert torch.equal(v, results['by hand'][k]) and v.dtype == torch.float32, k
    assert not all(torch.equal(v, results['fp32'][k]) for k, v in results['amp'].items())


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
def test_scan_custom_op_passes_opcheck():
    """The op's schema, fake implementation and autograd registration are consistent (torch.library.opcheck),
    with every optional input, through the CPU backends."""
    g = torch.Generator().manual_seed(0)
    b, dim, n, length = 2, 8, 4, 13
    args = [torch.randn(b, dim, length, generator=g), torch.randn(b, dim, length, generator=g),
            -torch.rand(dim, n, generator=g) - 0.1, torch.randn(b, 2, n, length, generator=g),
            torch.randn(b, n, length, generator=g), torch.randn(dim, generator=g),
            torch.randn(b, dim, length, generator=g), torch.randn(dim, generator=g)]
    args = [a.requires_grad_() for a in args]
    for backend in ('torch', 'compiled', 'reference'):
        torch.library.opcheck(op._scan_op, (*args, True, True, backend))
        torch.library.opcheck(op._scan_op, (*args[:5], None, None, None, False, False, backend))


def test_compiled_network_equals_eager():
    """A tiny MambaIR under torch.compile in one graph (fullgraph=True): inductor's output equals eager's; a
    training step through AOT autograd (the custom op's gradient) gives eager's gradients. (Compiling with
    inductor once costs tens of seconds on a small CPU, most of it fixed set-up; its backward code generation
    is PyTorch's, the graph capture and the op's autograd are what is ours.)"""
    torch.manual_seed(0)
    net = arch_class('MambaIR')(**{k: v for k, v in TINY_NETWORK.items() if k != 'type'})
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x), rtol=1e-5, atol=1e-5)
    grads = []
    for model in (net, torch.compile(net, fullgraph=True, backend='aot_eager')):
        net.zero_grad()
        model(x).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-7, msg=k)


def test_compile_option_compiles_in_place(tmp_path, sr_data):
    """network_g:compile builds the model with a compiled forward: same parameter names, same output, with
    any scan backend forced (the op resolves it when it runs)."""
    from basicsr.models import build_model

    hr, lr = sr_data
    compile_opt = {'fullgraph': True, 'backend': 'aot_eager'}  # inductor: test_compiled_network_equals_eager
    opt = sr_train_options('compiled', hr, lr, dict(TINY_NETWORK, compile=compile_opt))
    opt.update(is_train=False, dist=False, num_gpu=0, path=dict(pretrain_network_g=None))
    model = build_model(opt)
    assert model.compile_kwargs == compile_opt
    assert model.net_g._compiled_call_impl is not None  # what nn.Module.compile sets
    eager = arch_class('MambaIR')(**{k: v for k, v in TINY_NETWORK.items() if k != 'type'})
    eager.load_state_dict(model.net_g.state_dict())  # strict: the names did not change
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad(), scan_backend('reference'):
        torch.testing.assert_close(model.net_g(x), eager(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='network_g:compile must be'):
        build_model(dict(opt, network_g=dict(TINY_NETWORK, compile='yes')))
    # mambair-restore --opt with such a file: the option is not the arch's, it is ignored there
    restored = load_model(eager.state_dict(), opt={'network_g': dict(TINY_NETWORK, compile=True), 'scale': 2})
    assert restored.scale == 2


def test_selective_scan_is_one_node_when_compiled():
    """Dynamo records the scan as the custom op (no graph break inside the dispatcher)."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(1)
    u, delta, z = (torch.randn(1, 4, 9, generator=g) for _ in range(3))
    A, B, C = -torch.rand(4, 2, generator=g), torch.randn(1, 2, 9, generator=g), torch.randn(1, 2, 9, generator=g)
    fn = torch.compile(lambda *a: selective_scan(*a, z=z, delta_softplus=True), backend=count, fullgraph=True)
    torch.testing.assert_close(fn(u, delta, A, B, C), selective_scan(u, delta, A, B, C, z=z, delta_softplus=True))
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == 'call_function']
    assert targets.count('basicsr_mambair.selective_scan.default') == 1, targets
