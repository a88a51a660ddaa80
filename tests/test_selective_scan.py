"""Selective scan: the chunked ``torch`` backend against a float64 sequential evaluation, backend selection
(the ``compiled`` backend: test_compiled_scan.py)."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import SCAN_GRAD_NAMES as GRAD_NAMES
from helpers import SCAN_OPTION_CASES, assert_close
from helpers import scan_with_grads as run

from basicsr_mambair.ops import scan as ss
from basicsr_mambair.ops.scan import chunked, cuda, get_backend, scan_backend, selective_scan, triton
from basicsr_mambair.ops.scan import selective_scan_reference as reference


def make_inputs(batch=2, dim=8, length=7, n=4, groups=4, grouped=True, dt_scale=1.0, a_max=4.0, seed=0,
                dtype=torch.float32):
    """Random scan inputs; A < 0; delta around softplus^-1 of typical steps (or of ``dt_scale``)."""
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, groups, n, length) if grouped else (batch, n, length)
    return {
        'u': torch.randn(batch, dim, length, generator=g, dtype=torch.float64).to(dtype),
        'delta': (torch.randn(batch, dim, length, generator=g, dtype=torch.float64) * dt_scale).to(dtype),
        'A': -(torch.rand(dim, n, generator=g, dtype=torch.float64) * a_max + 0.01).to(dtype),
        'B': torch.randn(*bc_shape, generator=g, dtype=torch.float64).to(dtype),
        'C': torch.randn(*bc_shape, generator=g, dtype=torch.float64).to(dtype),
        'D': torch.randn(dim, generator=g, dtype=torch.float64).to(dtype),
        'z': torch.randn(batch, dim, length, generator=g, dtype=torch.float64).to(dtype),
        'delta_bias': (torch.randn(dim, generator=g, dtype=torch.float64) - 1).to(dtype),
    }


def check_against_float64(inputs, rtol=1e-5, **options):
    y, last, grads = run(lambda *a, **k: selective_scan(*a, backend='torch', **k), inputs, **options)
    inputs64 = {k: v.double() for k, v in inputs.items()}
    y64, last64, grads64 = run(reference, inputs64, **options)
    assert y.dtype == inputs['u'].dtype
    assert_close(y, y64, rtol, 'y')
    if last64 is not None:
        assert_close(last, last64, rtol, 'last state')
    assert grads.keys() == grads64.keys()
    for k in grads64:
        assert_close(grads[k], grads64[k], rtol, f'd{k}')


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 steps, groups of a few chunks, tiny serial spans: every code path runs on small inputs."""
    monkeypatch.setattr(chunked, 'CHUNK_LEN', 4)
    monkeypatch.setattr(chunked, 'GROUP_ELEMS', 4 * 3 * 2 * 8 * 4)  # 3 chunks per group at batch 2, dim 8, N 4
    monkeypatch.setattr(chunked, '_span_len', lambda device: 40)  # as with several threads, in smaller spans


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('length', [1, 7, 1000])
@pytest.mark.parametrize('grouped', [True, False], ids=['B(b,G,N,L)', 'B(b,N,L)'])
def test_matches_float64_reference(length, grouped):
    check_against_float64(make_inputs(length=length, grouped=grouped))


@pytest.mark.parametrize('options', SCAN_OPTION_CASES)
@pytest.mark.parametrize('length', [7, 301])
def test_options_match_float64_reference(options, length):
    inputs = make_inputs(length=length, dim=12, groups=4, dt_scale=0.5, seed=length)
    if not options['softplus']:  # delta must be a positive step without softplus
        inputs['delta'] = inputs['delta'].abs() * 0.3
        inputs['delta_bias'] = inputs['delta_bias'].abs() * 0.1
    check_against_float64(inputs, **options)


@pytest.mark.parametrize('length', [1, 5, 12, 13, 50])
@pytest.mark.parametrize('groups', [1, 2, 4])
def test_chunk_boundaries_match_float64_reference(small_chunks, length, groups):
    """Lengths around chunk/group multiples, several groups per call, spans split inside a chunk."""
    check_against_float64(make_inputs(length=length, groups=groups, seed=length + groups))


@pytest.mark.parametrize('length', [1, 5, 12, 13, 50])
@pytest.mark.parametrize('softplus', [True, False])
@pytest.mark.parametrize('stream_elems', [1, 400], ids=['block=group', 'block=2groups'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_inference_path_matches_float64_reference(small_chunks, monkeypatch, length, softplus, stream_elems, dtype):
    """Without autograd dt and x are built in blocks of groups (another code path): same values."""
    monkeypatch.setattr(chunked, 'STREAM_ELEMS', stream_elems)  # a group: 3 chunks x 4 steps x batch 2 x dim 8 = 192
    inputs = make_inputs(length=length, groups=2, seed=length, dtype=dtype)
    if not softplus:
        inputs['delta'] = inputs['delta'].abs() * 0.3
    kw = dict(delta_bias=inputs['delta_bias'].abs(), delta_softplus=softplus, return_last_state=True)
    args = [inputs[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z')]
    with torch.no_grad():
        y, last = selective_scan(*args, backend='torch', **kw)
    y64, last64 = reference(*(t.double() for t in args),
                            **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    assert_close(y, y64, 1e-5, 'y')
    assert_close(last, last64, 1e-5, 'last state')


def test_single_chunk_per_group(monkeypatch):
    """Each group is a single chunk when one chunk's state exceeds GROUP_ELEMS (large batch * dim)."""
    monkeypatch.setattr(chunked, 'GROUP_ELEMS', 1)
    check_against_float64(make_inputs(length=37, seed=3))


def test_gradient_from_last_state_only():
    inputs = make_inputs(length=50)
    kw = dict(delta_bias=inputs['delta_bias'], delta_softplus=True, return_last_state=True)
    grads = []
    for fn, dtype in ((lambda *a, **k: selective_scan(*a, backend='torch', **k), torch.float32),
                      (reference, torch.float64)):
        leaves = [inputs[k].to(dtype).requires_grad_() for k in ('u', 'delta', 'A', 'B')]  # C: unused by h
        _, last = fn(*leaves, inputs['C'].to(dtype), **{k: (v.to(dtype) if torch.is_tensor(v) else v)
                                                        for k, v in kw.items()})
        grads.append(torch.autograd.grad(last.sum(), leaves))
    for name, g, g64 in zip('u delta A B'.split(), *grads):
        assert_close(g, g64, 1e-5, name)


def test_stress_large_steps_and_decays():
    """dt up to 3 and |A| up to 100 over L = 4096: exp(-sum dt*A) overflows, the chunked scan must not."""
    inputs = make_inputs(batch=1, dim=8, n=4, length=4096, groups=2, a_max=100.0, seed=5)
    inputs['delta'] = torch.rand(inputs['delta'].shape, generator=torch.Generator().manual_seed(6)) * 3
    naive = torch.exp(-torch.cumsum(inputs['delta'][..., None] * inputs['A'][:, None], dim=2))
    assert not torch.isfinite(naive).all()  # the cumulative-product formulation breaks here
    check_against_float64(inputs, use_bias=False, softplus=False, use_z=False)


def test_gradcheck_float64(small_chunks):
    inputs = {k: v.double().requires_grad_() for k, v in make_inputs(length=11, groups=2, seed=7).items()}

    def fn(u, delta, A, B, C, D, z, delta_bias):
        y, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, return_last_state=True,
                                 backend='torch')
        return y, last

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in GRAD_NAMES), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_softplus_matches_torch(dtype):
    """The vectorised softplus of the torch backend against F.softplus (threshold 20), to about an ulp."""
    x = torch.cat([torch.linspace(-120, 60, 20001, dtype=torch.float64), torch.tensor([20.0, 20.5, -1e-9, 0.0])])
    x = x.to(dtype)
    eps = torch.finfo(dtype).eps
    for inplace in (False, True):
        y = chunked._softplus(x.clone(), inplace=inplace)
        torch.testing.assert_close(y, F.softplus(x), rtol=4 * eps, atol=torch.finfo(dtype).tiny)
        assert torch.equal(y[x > 20], x[x > 20])


# ------------------------------------------------------------------------------------------------
# dtypes, modes, devices
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    inputs = {k: v.to(dtype) for k, v in make_inputs(length=33).items()}
    args = [inputs[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D')]
    y, last = selective_scan(*args, z=inputs['z'], delta_bias=inputs['delta_bias'], delta_softplus=True,
                             return_last_state=True, backend='torch')
    y32, last32 = selective_scan(*[a.float() for a in args], z=inputs['z'].float(),
                                 delta_bias=inputs['delta_bias'].float(), delta_softplus=True,
                                 return_last_state=True, backend='torch')
    assert y.dtype == dtype and last.dtype == torch.float32
    assert torch.equal(y, y32.to(dtype)) and torch.equal(last, last32)
    leaves = [a.detach().requires_grad_() for a in args]
    selective_scan(*leaves, delta_softplus=True, backend='torch').float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == dtype and torch.isfinite(a.grad).all() for a in leaves)


def test_no_grad_keeps_nothing_for_backward(monkeypatch):
    calls = []
    forward = chunked._chunked_forward

    def spy(*args, **kwargs):
        calls.append(kwargs['save_starts'])
        return forward(*args, **kwargs)

    monkeypatch.setattr(chunked, '_chunked_forward', spy)
    inputs = make_inputs(length=20)
    args = [inputs[k] for k in ('u', 'delta', 'A', 'B', 'C')]
    with torch.no_grad():
        y = selective_scan(*args, backend='torch')
    with torch.inference_mode():
        selective_scan(*args, backend='torch')
    assert not y.requires_grad and calls == [False, False]
    selective_scan(*[a.requires_grad_() for a in args], backend='torch')
    assert calls == [False, False, True]


def test_gradients_of_d_and_z_only():
    """Scan inputs without grad (inference path of the scan itself), D and z with grad."""
    inputs = make_inputs(length=30)
    grads = []
    for fn, dtype in ((lambda *a, **k: selective_scan(*a, backend='torch', **k), torch.float32),
                      (reference, torch.float64)):
        args = [inputs[k].to(dtype) for k in ('u', 'delta', 'A', 'B', 'C')]
        D, z = (inputs[k].to(dtype).requires_grad_() for k in ('D', 'z'))
        y = fn(*args, D, z, delta_bias=inputs['delta_bias'].to(dtype), delta_softplus=True)
        grads.append(torch.autograd.grad((y * inputs['u'].to(dtype)).sum(), (D, z)))
    for name, g, g64 in zip(('D', 'z'), *grads):
        assert_close(g, g64, 1e-5, name)


def test_torch_backend_is_device_agnostic():
    """Forward and backward run on the meta device: no CPU-only calls (the same code serves CUDA tensors)."""
    inputs = {k: v.to('meta').requires_grad_() for k, v in make_inputs(length=37).items()}
    args = [inputs[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D')]
    y, last = selective_scan(*args, z=inputs['z'], delta_bias=inputs['delta_bias'], delta_softplus=True,
                             return_last_state=True, backend='torch')
    assert y.device.type == 'meta' and y.shape == inputs['u'].shape and last.shape == (2, 8, 4)
    (y.sum() + last.sum()).backward()
    assert all(inputs[k].grad.shape == inputs[k].shape for k in GRAD_NAMES)


def test_reference_backend_matches_torch_backend():
    inputs = make_inputs(length=64)
    args = [inputs[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D')]
    kw = dict(z=inputs['z'], delta_bias=inputs['delta_bias'], delta_softplus=True)
    torch.testing.assert_close(selective_scan(*args, backend='reference', **kw),
                               selective_scan(*args, backend='torch', **kw), rtol=1e-5, atol=1e-5)


def test_input_validation():
    inputs = make_inputs(length=5)
    u, delta, A, B, C = (inputs[k] for k in ('u', 'delta', 'A', 'B', 'C'))
    with pytest.raises(ValueError, match='A must be'):
        selective_scan(u, delta, A[:3], B, C, backend='torch')
    with pytest.raises(ValueError, match='B must be'):
        selective_scan(u, delta, A, B[:, :3], C, backend='torch')  # 3 groups do not divide dim 8
    with pytest.raises(ValueError, match='u and delta'):
        selective_scan(u, delta[..., :4], A, B, C, backend='torch')
    with pytest.raises(NotImplementedError):
        selective_scan(u, delta, A.to(torch.complex64), B, C, backend='torch')


# ------------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_mamba(monkeypatch):
    """mamba_ssm absent (importing it raises ImportError) and fresh one-time log/warning records."""
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    ss.reset()
    yield
    ss.reset()


def test_import_does_not_import_mamba_ssm():
    assert 'mamba_ssm' not in sys.modules or sys.modules['mamba_ssm'] is None


@pytest.mark.parametrize('backend', ['cuda', 'triton'])
def test_gpu_request_on_cpu_falls_back_with_one_warning(no_mamba, monkeypatch, backend):
    monkeypatch.setenv(ss.ENV_VAR, backend)
    inputs = make_inputs(length=9)
    args = [inputs[k] for k in ('u', 'delta', 'A', 'B', 'C')]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        y1 = selective_scan(*args)
        y2 = selective_scan(*args)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert f'backend "{backend}" needs CUDA tensors' in str(caught[0].message)
    assert 'falling back' in str(caught[0].message)
    assert torch.equal(y1, y2) and torch.equal(y1, selective_scan(*args, backend='torch'))


def test_cuda_device_without_mamba_ssm(no_mamba, monkeypatch):
    assert get_backend('cuda') == ('triton' if triton.unavailable_reason() is None else 'torch')
    assert get_backend(torch.device('cpu')) == ('compiled' if ss.compiled.unavailable_reason() is None else 'torch')
    cuda.reset()
    with pytest.warns(RuntimeWarning, match='mamba_ssm does not import'):
        assert ss.resolve_backend('cuda', torch.device('cuda')) in ('triton', 'torch')
    # auto on CUDA: mamba_ssm where it imports, else triton where it runs, else torch
    monkeypatch.setattr(triton, 'unavailable_reason', lambda: 'no CUDA GPU')
    assert get_backend('cuda') == 'torch'
    with pytest.warns(RuntimeWarning, match='backend "triton" is unavailable: no CUDA GPU'):
        assert ss.resolve_backend('triton', torch.device('cuda')) == 'torch'
    monkeypatch.setattr(triton, 'unavailable_reason', lambda: None)
    assert get_backend('cuda') == 'triton'
    assert ss.resolve_backend('triton', torch.device('cuda')) == 'triton'
    monkeypatch.setattr(cuda, 'unavailable_reason', lambda: None)
    assert get_backend('cuda') == 'cuda'


def test_selection_precedence_and_logging(no_mamba, monkeypatch, caplog):
    monkeypatch.setenv(ss.ENV_VAR, 'reference')
    cpu = torch.device('cpu')
    with caplog.at_level(logging.INFO, logger='basicsr'):
        assert ss.resolve_backend(None, cpu) == 'reference'  # environment variable
        with scan_backend('torch'):
            assert ss.resolve_backend(None, cpu) == 'torch'  # context manager beats the environment
            assert ss.resolve_backend('reference', cpu) == 'reference'  # explicit argument beats both
        assert ss.resolve_backend(None, cpu) == 'reference'  # override restored
        assert ss.resolve_backend('torch', cpu) == 'torch'
        monkeypatch.setenv(ss.ENV_VAR, 'AUTO')
        auto = ss.resolve_backend(None, cpu)
        assert auto == get_backend(cpu)
    logged = [r.getMessage() for r in caplog.records if r.name == 'basicsr']
    assert logged[:2] == ['Selective scan backend: reference', 'Selective scan backend: torch']  # once per backend
    assert len(logged) == 2 + (auto != 'torch') and logged[-1].startswith(f'Selective scan backend: {auto}')
    monkeypatch.setenv(ss.ENV_VAR, 'fast')
    with pytest.raises(ValueError, match='unknown selective scan backend'):
        ss.resolve_backend(None, cpu)
    with pytest.raises(ValueError):
        with scan_backend('nope'):
            pass
