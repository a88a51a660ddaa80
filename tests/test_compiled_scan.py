"""The ``compiled`` scan backend (C kernel on the CPU): exactness of outputs and gradients, its exp and
softplus, threads, dispatch, the build cache and every way the build can fail."""

from __future__ import annotations

import logging
import math
import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import SCAN_OPTION_CASES, assert_close, require_kernel, scan_with_grads

from basicsr_mambair.errors import KernelUnavailable
from basicsr_mambair.ops import scan as ss
from basicsr_mambair.ops.scan import compiled, selective_scan, selective_scan_reference


@pytest.fixture(autouse=True)
def kernel():
    """The built kernel. Where a C compiler exists it must build and pass its self-check (a failure here is
    a bug, not a skip); only a machine without one skips."""
    compiled.reset()
    require_kernel(compiled.load)
    yield
    compiled.reset()
    ss.reset()


def inputs(batch=2, dim=40, groups=4, n=16, length=70, b_groups=None, c_groups=None, dt_scale=1.0, a_max=4.0,
           seed=0, dtype=torch.float32):
    """Scan inputs; B and C get ``b_groups`` / ``c_groups`` groups (0: the shared (batch, N, L) layout)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def bc(k):
        k = groups if k is None else k
        return rnd(batch, k, n, length) if k else rnd(batch, n, length)

    t = {'u': rnd(batch, dim, length), 'delta': rnd(batch, dim, length) * dt_scale,
         'A': -(torch.rand(dim, n, generator=g, dtype=torch.float64) * a_max + 0.01), 'B': bc(b_groups),
         'C': bc(c_groups), 'D': rnd(dim), 'z': rnd(batch, dim, length), 'delta_bias': rnd(dim) - 1}
    return {k: v.to(dtype) for k, v in t.items()}


def scan(t, backend, use_d=True, use_z=True, use_bias=True, softplus=True, last_state=True):
    out = selective_scan(t['u'], t['delta'], t['A'], t['B'], t['C'], t['D'] if use_d else None,
                         z=t['z'] if use_z else None, delta_bias=t['delta_bias'] if use_bias else None,
                         delta_softplus=softplus, return_last_state=last_state, backend=backend)
    return out if last_state else (out, None)


def check(t, **options):
    """Compiled float32 against the float64 sequential reference, to 1e-5 of the largest value."""
    with torch.no_grad():
        y, last = scan(t, 'compiled', **options)
        y64, last64 = scan({k: v.double() for k, v in t.items()}, 'reference', **options)
    assert y.dtype == t['u'].dtype
    assert_close(y, y64, name='y')
    if last64 is not None:
        assert last.dtype == torch.float32
        assert_close(last, last64, name='last state')


def check_grads(t, **options):
    """Outputs and the gradients w.r.t. every used input, compiled float32 against the float64 reference."""
    y, last, grads = scan_with_grads(lambda *a, **k: selective_scan(*a, backend='compiled', **k), t, **options)
    y64, last64, grads64 = scan_with_grads(selective_scan_reference, {k: v.double() for k, v in t.items()},
                                           **options)
    assert_close(y, y64, name='y')
    if last64 is not None:
        assert_close(last, last64, name='last state')
    assert grads.keys() == grads64.keys()
    for k in grads64:
        assert grads[k].dtype == t[k].dtype
        assert_close(grads[k], grads64[k], name=f'd{k}')


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('length', [1, 7, 63, 64, 65, 1000])
@pytest.mark.parametrize('n', [16, 10, 3], ids=['N16', 'N10', 'N3'])
def test_matches_float64_reference(length, n):
    """Both specialised state sizes and the generic one; partial tiles; dim 40 = 4 groups of 10 channels
    (one partial block of 16 each), batch 2."""
    check(inputs(n=n, length=length, seed=length + n))


@pytest.mark.parametrize('layout', [(4, 4), (0, 0), (4, 0), (0, 2), (1, 1)],
                         ids=['grouped', 'shared', 'B grouped, C shared', 'B shared, C 2 groups', 'G=1'])
@pytest.mark.parametrize('dim', [8, 96])
def test_b_c_layouts_and_channel_blocks(layout, dim):
    """Every B/C layout; 2 channels per group, and 24 (a full block of 16 and a partial one)."""
    b_groups, c_groups = layout
    check(inputs(dim=dim, b_groups=b_groups, c_groups=c_groups, length=130, seed=dim))


@pytest.mark.parametrize('layout', ['projection slices', 'step-major storage', 'batch-expanded', 'batch 2 of 3'])
def test_strided_b_and_c_are_read_in_place(layout):
    """B and C as MambaIR passes them (slices of one (batch, G, R + 2N, L) projection) and other strided
    forms: the kernel reads them through their strides; each agrees with the float64 reference."""
    batch, groups, n, length = 2, 4, 16, 70
    t = inputs(batch=batch, length=length, seed=21)
    g = torch.Generator().manual_seed(22)
    if layout == 'projection slices':
        proj = torch.randn(batch, groups, 3 + 2 * n, length, generator=g)
        t['B'], t['C'] = proj[:, :, 3:3 + n], proj[:, :, 3 + n:]
    elif layout == 'step-major storage':
        t['B'] = torch.randn(batch, groups, length, n, generator=g).transpose(-1, -2)
        t['C'] = torch.randn(batch, length, n, generator=g).transpose(-1, -2)
    elif layout == 'batch-expanded':
        t['B'] = torch.randn(1, groups, n, length, generator=g).expand(batch, -1, -1, -1)
        t['C'] = torch.randn(1, n, length, generator=g).expand(batch, -1, -1)
    else:  # rows not evenly spaced: batch elements 0 and 2 of 3
        t['B'] = torch.randn(3, groups, n, length, generator=g)[::2]
        t['C'] = torch.randn(3, groups, n, length, generator=g)[::2]
    assert not t['B'].is_contiguous()
    check(t)


@pytest.mark.parametrize('options', SCAN_OPTION_CASES)
def test_options_match_float64_reference(options):
    t = inputs(length=301, dt_scale=0.5, seed=3)
    if not options['softplus']:  # delta must be a positive step without softplus
        t['delta'], t['delta_bias'] = t['delta'].abs() * 0.3, t['delta_bias'].abs() * 0.1
    check(t, **options)


def test_stress_large_steps_and_decays():
    """dt up to 3 and |A| up to 100 over L = 4096: exponents far below float32's range (checked exp),
    mixed with tiles of small steps (unchecked exp)."""
    t = inputs(batch=1, dim=32, n=16, length=4096, a_max=100.0, seed=5)
    dt = torch.rand(t['delta'].shape, generator=torch.Generator().manual_seed(6)) * 3
    dt[..., 1000:2000] *= 1e-3
    t['delta'] = dt
    check(t, use_bias=False, softplus=False, use_z=False)


def test_overflow_and_nan_behave_like_the_reference():
    """Growing states (A > 0 in channels 8-15) overflow to inf and then NaN at the same places as in the
    float32 reference; a NaN input poisons its own channel only."""
    t = inputs(batch=1, dim=32, groups=1, n=4, length=40, seed=8)
    t['A'][8:16] = t['A'][8:16].abs() * 40
    t['delta'] = t['delta'].abs() + 0.5
    t['u'][0, 3, 5] = float('nan')
    with torch.no_grad():
        y, last = scan(t, 'compiled', softplus=False, use_bias=False, use_z=False)
        y_ref, last_ref = scan(t, 'reference', softplus=False, use_bias=False, use_z=False)
    assert not torch.isfinite(y_ref[0, 8:16]).all() and torch.isfinite(y_ref[0, 16:]).all()
    for got, want in ((y, y_ref), (last, last_ref)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    assert torch.isnan(y[0, 3, 5:]).all() and torch.isfinite(y[0, 3, :5]).all() and torch.isfinite(y[0, 4]).all()


def test_exp_is_accurate_over_the_float32_range():
    """Two steps, N = 1, u = (1, 0), B = C = 1, dt = 1: the second output is exp(A) as the kernel computes
    it, for A across float32's range: 2^(A * log2(e)) like mamba_ssm's kernel, to ~1 ulp of the float32
    exponent (subnormal results flushed to 0)."""
    a = torch.cat([torch.linspace(-104, 88.72, 40001), torch.tensor([-1e4, -87.4, 88.7, -float('inf')])])
    k = a.numel()
    u = torch.tensor([1.0, 0.0]).repeat(1, k, 1)
    y = selective_scan(u, torch.ones(1, k, 2), a[:, None], torch.ones(1, 1, 2), torch.ones(1, 1, 2),
                       backend='compiled')[0, :, 1].double()
    want = 2 ** (a * compiled.LOG2E).double()
    tiny = torch.finfo(torch.float32).tiny
    normal = want >= 2 * tiny
    assert torch.isfinite(y).all() and want[:-1].max() < torch.finfo(torch.float32).max
    assert ((y - want).abs() / want)[normal].max().item() < 4 * 2.0 ** -24  # ~1 ulp
    assert (y[~normal] <= 2 * tiny).all()


def test_softplus_is_accurate():
    """L = 1, N = 1, u = B = C = 1: the output is dt = softplus(delta) as the kernel computes it."""
    x = torch.cat([torch.linspace(-120, 60, 20001, dtype=torch.float64),
                   torch.tensor([20.0, 20.5, -1e-9, 0.0, 1e-30, float('inf'), -float('inf'), float('nan')],
                                dtype=torch.float64)]).float()
    k = x.numel()
    y = selective_scan(torch.ones(1, k, 1), x.view(1, k, 1), -torch.ones(k, 1), torch.ones(1, 1, 1),
                       torch.ones(1, 1, 1), delta_softplus=True, backend='compiled').view(-1)
    want = F.softplus(x.double())
    fin = torch.isfinite(want) & (want >= torch.finfo(torch.float32).tiny)
    assert ((y.double() - want).abs() / want)[fin].max().item() < 4 * 2.0 ** -24
    assert torch.equal(y[x > 20], x[x > 20])  # mamba_ssm's threshold: softplus(x) = x above 20
    assert y[-3] == float('inf') and y[-2] == 0 and torch.isnan(y[-1])


# ------------------------------------------------------------------------------------------------
# gradients (the kernel's backward)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('length', [1, 7, 65, 300])
@pytest.mark.parametrize('n', [16, 10, 3], ids=['N16', 'N10', 'N3'])
def test_gradients_match_float64_reference(length, n):
    """Every input's gradient with D, z, bias, softplus and the last state in the loss; partial blocks
    (10 channels per group) and tiles (65, 300 steps)."""
    check_grads(inputs(n=n, length=length, seed=length + n))


@pytest.mark.parametrize('layout', [(4, 4), (0, 0), (4, 0), (0, 2)],
                         ids=['grouped', 'shared', 'B grouped, C shared', 'B shared, C 2 groups'])
def test_gradients_for_every_b_c_layout(layout):
    """dB and dC are summed over the channels of a group (and over all groups where B or C is shared)."""
    check_grads(inputs(dim=96, b_groups=layout[0], c_groups=layout[1], length=70, seed=4))


@pytest.mark.parametrize('options', SCAN_OPTION_CASES)
def test_gradients_with_options(options):
    t = inputs(length=129, dt_scale=0.5, seed=12)
    if not options['softplus']:
        t['delta'], t['delta_bias'] = t['delta'].abs() * 0.3, t['delta_bias'].abs() * 0.1
    check_grads(t, **options)


def test_gradients_under_large_steps_and_decays():
    """The checked exp in the backward too: dt up to 3, |A| up to 100, L = 4096."""
    t = inputs(batch=1, dim=32, n=16, length=4096, a_max=100.0, seed=5)
    t['delta'] = torch.rand(t['delta'].shape, generator=torch.Generator().manual_seed(6)) * 3
    t['delta'][..., 1000:2000] *= 1e-3
    check_grads(t, use_bias=False, softplus=False, use_z=False)


def test_gradient_from_the_last_state_only():
    """y unused: its gradient arrives as None, the last state's drives every input gradient."""
    t = inputs(length=100, seed=13)
    grads = []
    for backend, dtype in (('compiled', torch.float32), ('reference', torch.float64)):
        leaves = [t[k].to(dtype).requires_grad_() for k in ('u', 'delta', 'A', 'B')]
        _, last = selective_scan(*leaves, t['C'].to(dtype), delta_softplus=True, return_last_state=True,
                                 backend=backend)
        grads.append(torch.autograd.grad(last.sum(), leaves))
    for name, g, g64 in zip('u delta A B'.split(), *grads):
        assert_close(g, g64, name=name)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    """Inference: the values of the float32 computation, rounded. Training: gradients in the input dtype,
    close to the float32 ones (the output's gradient itself arrives rounded to the half dtype)."""
    t = inputs(length=33, dtype=dtype)
    with torch.no_grad():
        y, last = scan(t, 'compiled')
        y32, last32 = scan({k: v.float() for k, v in t.items()}, 'compiled')
    assert y.dtype == dtype and last.dtype == torch.float32
    assert torch.equal(y, y32.to(dtype)) and torch.equal(last, last32)
    _, _, grads = scan_with_grads(lambda *a, **k: selective_scan(*a, backend='compiled', **k), t)
    _, _, grads32 = scan_with_grads(lambda *a, **k: selective_scan(*a, backend='compiled', **k),
                                    {k: v.float() for k, v in t.items()})
    for k in grads:
        assert grads[k].dtype == dtype, k
        assert_close(grads[k], grads32[k], rtol=2e-2, name=k)


def test_threads_split_the_work_without_changing_a_bit(monkeypatch):
    """Forward and backward on 1, 2 and 3 threads: outputs and gradients identical to the last bit."""
    monkeypatch.setattr(compiled, 'MIN_PARALLEL_ELEMS', 1)
    t = inputs(batch=3, dim=96, length=200, seed=11)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, last, grads = scan_with_grads(lambda *a, **k: selective_scan(*a, backend='compiled', **k), t)
            with torch.no_grad():
                results.append((*scan(t, 'compiled'), y, last, *grads.values()))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results[0]))


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
def test_auto_uses_the_kernel_on_the_cpu_and_torch_for_float64(monkeypatch, caplog):
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    ss.reset()
    assert ss.get_backend('cpu') == 'compiled'
    calls = []
    for name in ('scan_forward', 'scan_autograd'):
        real = getattr(compiled, name)
        monkeypatch.setattr(compiled, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    t = inputs(length=50)
    with caplog.at_level(logging.INFO, logger='basicsr'):
        with torch.no_grad():
            y_auto = scan(t, None)
        leaves = {k: v.clone().requires_grad_(k == 'B') for k, v in t.items()}
        y_train = scan(leaves, None)
    assert calls == ['scan_forward', 'scan_autograd'] and 'Selective scan backend: compiled' in caplog.text
    with torch.no_grad():
        y_torch = scan(t, 'torch')
    for got in (y_auto, y_train):
        for a, b in zip(got, y_torch):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    calls.clear()
    t64 = {k: v.double() for k, v in t.items()}  # float64: the torch backend, bit for bit
    with torch.no_grad():
        for a, b in zip(scan(t64, 'compiled'), scan(t64, 'torch')):
            assert a.dtype == torch.float64 and torch.equal(a, b)
    assert not calls


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """No C compiler on PATH, CC unset, an empty kernel cache."""
    monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
    monkeypatch.delenv('CC', raising=False)
    monkeypatch.setenv('MAMBAIR_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    compiled.reset()
    ss.reset()


def test_without_a_compiler_auto_uses_torch_and_says_why(no_compiler, caplog):
    t = inputs(length=20)
    with caplog.at_level(logging.INFO, logger='basicsr'), torch.no_grad():
        y = scan(t, None)
    assert ss.get_backend('cpu') == 'torch'
    assert 'Selective scan backend: torch (compiled CPU kernel unavailable: no C compiler found' in caplog.text
    with torch.no_grad():
        assert torch.equal(y[0], scan(t, 'torch')[0])


def test_explicit_compiled_request_falls_back_with_one_warning(no_compiler):
    t = inputs(length=20)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter('always')
        y1, y2 = scan(t, 'compiled')[0], scan(t, 'compiled')[0]
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and 'no C compiler found' in str(runtime[0].message)
    assert torch.equal(y1, y2)


def test_failing_compiler_is_reported_in_one_line(no_compiler, monkeypatch, tmp_path):
    fake = tmp_path / 'bin' / 'cc'
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ncase "$1" in --version) echo fake 1.0;; *) echo "fatal: cannot build" >&2; exit 1;; '
                    'esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv('CC', str(fake))
    with pytest.raises(KernelUnavailable) as info:
        compiled.load()
    assert 'could not build scan_kernel.c, scan_fused.c: fatal: cannot build' in str(info.value)
    assert '\n' not in str(info.value)
    assert not list((tmp_path / 'cache').glob('*'))  # no half-written library left in the cache


def test_unwritable_cache_folder_falls_back_to_the_temp_folder(monkeypatch, tmp_path):
    not_a_folder = tmp_path / 'file'
    not_a_folder.write_text('')
    monkeypatch.setenv('MAMBAIR_CACHE_DIR', str(not_a_folder))
    monkeypatch.setattr(compiled.tempfile, 'tempdir', str(tmp_path / 'tmp'))
    compiled.reset()
    compiled.load()
    assert list((tmp_path / 'tmp').glob('basicsr_mambair-*/scan_kernel-*'))


def test_kernel_disagreeing_with_the_reference_is_not_used(monkeypatch):
    """The self-check that guards against a miscompiled kernel: with a wrong 'reference' it must refuse."""
    compiled.reset()
    monkeypatch.setattr(compiled, 'selective_scan_reference',
                        lambda *a, **k: tuple(2 * r for r in selective_scan_reference(*a, **k)))
    with pytest.raises(KernelUnavailable, match='disagrees with the reference'):
        compiled.load()


def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    """One build per (source, compiler, CPU); a new process loads the cached library without compiling."""
    monkeypatch.setenv('MAMBAIR_CACHE_DIR', str(tmp_path))
    compiled.reset()
    compiled.load()
    built = list(tmp_path.glob('scan_kernel-*'))
    assert len(built) == 1
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, 'run', lambda cmd, **k: runs.append(cmd) or real_run(cmd, **k))
    compiled.reset()
    compiled.load()
    assert all('--version' in cmd for cmd in runs)  # asked the compiler's version, compiled nothing
    assert list(tmp_path.glob('scan_kernel-*')) == built


def test_realistic_mambair_inputs_at_full_length():
    """MambaIR's initial values (S4D-real A = -(1..N), dt bias for steps in [1e-3, 0.1]) at L = 4096."""
    g = torch.Generator().manual_seed(0)
    dim, n, length = 64, 16, 4096
    dt0 = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    t = {'u': torch.randn(1, dim, length, generator=g), 'delta': 0.5 * torch.randn(1, dim, length, generator=g),
         'A': -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1),
         'B': torch.randn(1, 4, n, length, generator=g), 'C': torch.randn(1, 4, n, length, generator=g),
         'D': torch.ones(dim), 'z': None, 'delta_bias': dt0 + torch.log(-torch.expm1(-dt0))}
    with torch.no_grad():
        y = scan(t, 'compiled', use_z=False, last_state=False)[0]
        y64 = scan({k: (None if v is None else v.double()) for k, v in t.items()}, 'reference', use_z=False,
                   last_state=False)[0]
    assert_close(y, y64)


@pytest.mark.parametrize('context', [torch.no_grad, torch.inference_mode])
def test_first_scan_under_no_grad_or_inference_mode_builds_the_kernel(context, monkeypatch):
    """The self-check needs autograd; the first scan of a process is usually a model's inference."""
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    compiled.reset()
    ss.reset()
    t = inputs(length=20)
    with context():
        y = scan(t, None)[0]
    assert compiled.unavailable_reason() is None and ss.get_backend('cpu') == 'compiled'
    with torch.no_grad():
        torch.testing.assert_close(y, scan(t, 'torch')[0], rtol=1e-5, atol=1e-5)
