"""The fused scans of the C kernel (SS2D's four directions, MambaIRv2's permuted scan): outputs and every
gradient against the float64 reference and against the unfused path, on odd and degenerate maps; threads;
dispatch; argument checks; the kernel's self-check of these entry points."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, require_kernel

from basicsr_mambair.archs import ss2d as ss2d_module
from basicsr_mambair.archs.ss2d import SS2D
from basicsr_mambair.errors import KernelUnavailable
from basicsr_mambair.ops import scan as ss
from basicsr_mambair.ops.scan import compiled, fused, permuted_selective_scan, scan_backend, uses_fused_kernel
from basicsr_mambair.ops.scan.orders import cross_positions, ordered_scan

# (H, W): odd, H != W both ways, a single row / column, a single pixel, and more than two tiles of steps
# whose column-major walk wraps inside a tile
MAPS = [(5, 7), (7, 5), (1, 9), (9, 1), (1, 1), (11, 13)]
GRAD_NAMES = ('u', 'proj', 'dt_weight', 'dt_bias', 'A', 'D')


@pytest.fixture(autouse=True)
def kernel():
    """The built kernel: where a C compiler exists it must build and pass its self-check (a failure is a bug)."""
    compiled.reset()
    fused.reset()
    require_kernel(fused.load)
    yield
    compiled.reset()
    ss.reset()


def cross_inputs(batch=2, height=5, width=7, dim=20, n=16, rank=3, seed=0, dtype=torch.float64) -> dict:
    """Inputs of :func:`fused.scan_cross` (dim 20: one full and one partial block of 16 channels)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t = {'u': rnd(batch, height, width, dim), 'proj': rnd(batch, height, width, 4, rank + 2 * n),
         'dt_weight': rnd(4, dim, rank) * 0.5, 'dt_bias': rnd(4, dim) - 1,
         'A': -(torch.rand(4 * dim, n, generator=g, dtype=torch.float64) * 4 + 0.01), 'D': rnd(4 * dim)}
    return {k: v.to(dtype) for k, v in t.items()}


def cross_reference(t: dict) -> torch.Tensor:
    """The four scans in the order of SS2D's cross_scan, by gathers and the sequential reference scan."""
    batch, height, width, dim = t['u'].shape
    y = ordered_scan(t['u'].reshape(batch, -1, dim), t['proj'].reshape(batch, height * width, 4, -1),
                     t['dt_weight'], t['dt_bias'], t['A'], t['D'], cross_positions(height, width))
    return y.view(batch, height, width, dim)


def fused_cross(t: dict) -> torch.Tensor:
    return fused.scan_cross(t['u'], t['proj'], t['dt_weight'], t['dt_bias'], t['A'], t['D'])


def with_grads(fn, t: dict, names=GRAD_NAMES, seed=1):
    """fn(leaves) and the gradients of a fixed random loss w.r.t. ``names``."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in t.items()}
    y = fn(leaves)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * weight).sum(), [leaves[k] for k in names])
    return y.detach(), dict(zip(names, grads))


def check_against_reference(fn, reference, t32: dict, names=GRAD_NAMES):
    """fn in float32 against reference in float64: output and every gradient, to 1e-5 of the largest value."""
    y, grads = with_grads(fn, t32, names)
    y64, grads64 = with_grads(reference, {k: v.double() if v.is_floating_point() else v for k, v in t32.items()},
                              names)
    assert y.dtype == torch.float32
    assert_close(y, y64, name='y')
    for k in names:
        assert grads[k].dtype == t32[k].dtype
        assert_close(grads[k], grads64[k], name=f'd{k}')


# ------------------------------------------------------------------------------------------------
# SS2D's four directions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('height,width', MAPS)
def test_cross_scan_matches_float64_reference(height, width):
    """Output and the gradients of u, the projection, dt weight and bias, A and D, batch 2."""
    check_against_reference(fused_cross, cross_reference, cross_inputs(height=height, width=width, seed=height * width,
                                                                       dtype=torch.float32))


@pytest.mark.parametrize('n,rank,dim', [(10, 4, 72), (3, 1, 8), (16, 12, 33)], ids=['light SR', 'N3', 'N16 R12'])
def test_cross_scan_state_sizes_and_widths(n, rank, dim):
    """MambaIR light SR's N 10 (R 4, 72 channels: four full blocks and a half one), a generic N, the classic N."""
    check_against_reference(fused_cross, cross_reference,
                            cross_inputs(height=6, width=11, dim=dim, n=n, rank=rank, seed=n, dtype=torch.float32))


def test_cross_scan_reads_strided_inputs_in_place():
    """u as the channels-last view of an NCHW-strided map, proj as the flat (B, H, W, 4 (R + 2N)) matmul output."""
    t = cross_inputs(height=7, width=6, dtype=torch.float32, seed=3)
    want = fused_cross(t)
    strided = dict(t, u=t['u'].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), proj=t['proj'].flatten(-2))
    assert not strided['u'].is_contiguous()
    assert torch.equal(fused_cross(strided), want)


def ss2d_pair(height: int, width: int, seed: int = 0) -> SS2D:
    torch.manual_seed(seed)
    module = SS2D(d_model=12, d_state=5, expand=1.5)  # d_inner 18: one full and one partial block
    with torch.no_grad():  # away from the init's tiny steps, so that every path matters
        module.dt_projs_bias.add_(2.0)
        module.Ds.normal_()
    return module


@pytest.mark.parametrize('height,width', MAPS)
def test_ss2d_fused_matches_unfused_with_gradients(height, width):
    """The whole SS2D through the fused kernel against the cross_scan path with the flat kernel
    (``compiled-unfused``): output, the input's gradient and every parameter's gradient."""
    module = ss2d_pair(height, width)
    x = torch.randn(2, height, width, 12, generator=torch.Generator().manual_seed(height + 10 * width))
    results = {}
    for backend in ('compiled', 'compiled-unfused'):
        leaf = x.clone().requires_grad_()
        module.zero_grad()
        with scan_backend(backend):
            y = module(leaf)
        y.square().sum().backward()
        results[backend] = (y.detach(), leaf.grad, {k: p.grad.clone() for k, p in module.named_parameters()})
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results['compiled'], results['compiled-unfused']
    assert_close(y, y_ref, name='y')
    assert_close(dx, dx_ref, name='dx')
    for k in grads_ref:
        assert_close(grads[k], grads_ref[k], rtol=2e-5, name=f'd{k}')


def test_ss2d_runs_the_fused_kernel_only_where_it_applies(monkeypatch):
    """auto / compiled on the CPU in float32: fused; compiled-unfused, torch, reference and float64: cross_scan."""
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    calls = []
    for name in ('scan_cross', 'selective_scan'):
        real = getattr(ss2d_module, name)
        monkeypatch.setattr(ss2d_module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    module = ss2d_pair(3, 4)
    x = torch.randn(1, 3, 4, 12)
    outputs = {}
    for backend in ('auto', 'compiled', 'compiled-unfused', 'torch', 'reference'):
        calls.clear()
        with torch.no_grad(), scan_backend(backend):
            outputs[backend] = module(x)
        assert calls == (['scan_cross'] if backend in ('auto', 'compiled') else ['selective_scan']), backend
    for backend, y in outputs.items():
        assert_close(y, outputs['reference'], name=backend)
    calls.clear()
    with torch.no_grad():
        module.double()(x.double())
    assert calls == ['selective_scan']


@pytest.mark.parametrize('training', [False, True])
def test_threads_split_the_work_without_changing_a_bit(monkeypatch, training):
    """1, 2 and 3 threads (forward units split by channel blocks, backward by direction): identical results."""
    monkeypatch.setattr(compiled, 'MIN_PARALLEL_ELEMS', 1)
    t = cross_inputs(batch=1, height=9, width=10, dim=72, n=10, rank=4, dtype=torch.float32, seed=7)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            if training:
                y, grads = with_grads(fused_cross, t)
                results.append([y, *grads.values()])
            else:
                results.append([fused_cross(t)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results[0]))


def test_cross_scan_refuses_bad_shapes_in_one_line():
    t = cross_inputs(dtype=torch.float32)
    bad = {'u': t['u'][..., :-1], 'proj': t['proj'][..., :-1], 'dt_weight': t['dt_weight'][:3],
           'dt_bias': t['dt_bias'][:, :-1], 'A': t['A'][:-1], 'D': t['D'][:-1]}
    for name, value in bad.items():
        with pytest.raises(ValueError, match='scan_cross') as info:
            fused_cross(dict(t, **{name: value}))
        assert '\n' not in str(info.value)
    with pytest.raises(ValueError, match='CPU tensors only'):  # a device pointer must never reach the C code
        fused_cross(dict(t, u=t['u'].to('meta')))


# ------------------------------------------------------------------------------------------------
# one direction over a permutation (MambaIRv2)
# ------------------------------------------------------------------------------------------------
def permuted_inputs(batch=2, length=150, dim=20, n=8, rank=3, seed=0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return {'u': rnd(batch, length, dim), 'proj': rnd(batch, length, rank + 2 * n),
            'dt_weight': rnd(1, dim, rank) * 0.5, 'dt_bias': rnd(1, dim) - 1,
            'A': -(torch.rand(dim, n, generator=g) * 4 + 0.01).to(dtype), 'D': rnd(dim), 'c_add': rnd(batch, length, n),
            'perm': torch.stack([torch.randperm(length, generator=g) for _ in range(batch)])}


def fused_permuted(t: dict) -> torch.Tensor:
    return fused.scan_permuted(t['u'], t['proj'], t['dt_weight'], t['dt_bias'], t['A'], t['D'], t['perm'], t['c_add'])


def permuted_reference(t: dict) -> torch.Tensor:
    """The definition: gather u and the projection into the sorted order, scan (C plus the step's c_add), and
    write each step's output back at its position."""
    sorted_u = t['u'].gather(1, t['perm'][..., None].expand_as(t['u']))
    sorted_proj = t['proj'].gather(1, t['perm'][..., None].expand_as(t['proj']))
    identity = torch.arange(t['u'].shape[1])[None, None]
    y_sorted = ordered_scan(sorted_u, sorted_proj[:, :, None], t['dt_weight'], t['dt_bias'], t['A'], t['D'], identity,
                            t['c_add'])
    return torch.zeros_like(y_sorted).scatter(1, t['perm'][..., None].expand_as(y_sorted), y_sorted)


@pytest.mark.parametrize('length,dim,n', [(150, 20, 8), (1, 16, 16), (64, 48, 10)])
def test_permuted_scan_matches_float64_reference(length, dim, n):
    """Output and the gradients of u, the projection, the C addend (MambaIRv2's prompt), dt weight and bias,
    A and D: 3 tiles with a partial one, a single step, exactly one tile."""
    t = permuted_inputs(length=length, dim=dim, n=n, seed=length)
    check_against_reference(fused_permuted, permuted_reference, t, names=(*GRAD_NAMES, 'c_add'))


@pytest.mark.parametrize('backend', ['torch', 'reference'])
def test_permuted_scan_other_backends_agree(backend):
    """permuted_selective_scan on the backends without the fused kernel (sorted copies) gives the same."""
    t = permuted_inputs(length=70, seed=5)
    args = (t['u'], t['proj'], t['dt_weight'], t['dt_bias'], t['A'], t['D'], t['perm'], t['c_add'])
    with torch.no_grad():
        y = permuted_selective_scan(*args, backend=backend)
        y_fused = permuted_selective_scan(*args, backend='compiled')
    assert_close(y, y_fused, name=backend)


def test_permuted_scan_refuses_bad_permutations():
    t = permuted_inputs(length=10)
    repeated = t['perm'].clone()
    repeated[1, 3] = repeated[1, 4]
    for perm, message in ((repeated, 'not a permutation'), (t['perm'] + 1, 'outside'), (t['perm'].int(), 'int64'),
                          (t['perm'][:1], '2 rows')):
        with pytest.raises(ValueError, match=message):
            fused_permuted(dict(t, perm=perm))


# ------------------------------------------------------------------------------------------------
# the kernel's self-check covers the fused entry points
# ------------------------------------------------------------------------------------------------
def test_self_check_catches_a_wrong_fused_forward(monkeypatch):
    fused.reset()
    monkeypatch.setattr(fused, 'ordered_scan', lambda *a, **k: 2 * ordered_scan(*a, **k))
    with pytest.raises(KernelUnavailable, match='fused y'):
        fused.load()
    assert not uses_fused_kernel(torch.device('cpu'), torch.float32, 'compiled')  # SS2D keeps the unfused path


def test_self_check_catches_a_wrong_fused_backward(monkeypatch):
    """The same outputs with gradients 1.5 times too large: only the backward's check can see it."""
    fused.reset()

    def steeper(*args, **kwargs):
        y = ordered_scan(*args, **kwargs)
        return y + 0.5 * (y - y.detach())

    monkeypatch.setattr(fused, 'ordered_scan', steeper)
    with pytest.raises(KernelUnavailable, match='fused du'):
        fused.load()
