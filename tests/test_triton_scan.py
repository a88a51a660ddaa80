"""The ``triton`` scan backend: on a CPU its kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, the
same source a GPU compiles), on a GPU compiled. Outputs, last states and every gradient against the float64
reference, for every option, odd lengths, tile and time-chunk boundaries, strided and half-precision inputs;
and why it is unavailable.

The interpreter executes the kernels element by element (~0.1 ms per scanned value), so most cases shrink the
tiles (a few steps, two channels) to cross every boundary with short sequences; one case keeps the shipped ones.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, SCAN_OPTION_CASES, assert_close, cli_env, scan_with_grads

from basicsr_mambair.errors import KernelUnavailable
from basicsr_mambair.ops import scan as ss
from basicsr_mambair.ops.scan import selective_scan_reference
from basicsr_mambair.ops.scan import triton as tb

pytest.importorskip('triton', reason='triton is not installed (it comes with torch on Linux)')

KERNELS = 'basicsr_mambair.ops.scan.triton_kernels'
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.fixture(scope='module', autouse=True)
def kernels():
    """The kernels: compiled and self-checked on a GPU; on a CPU interpreted, which needs TRITON_INTERPRET=1
    before Triton is first imported (Triton decides when it defines its own library): conftest.py sets it."""
    tb.reset()
    try:
        tb.load()
    except KernelUnavailable as exc:
        pytest.fail(f'the triton backend does not load although triton is installed: {exc}')
    if DEVICE == 'cpu' and not tb.interpreted():
        pytest.fail('triton was imported before TRITON_INTERPRET=1 was set; run pytest with it set')
    yield
    tb.reset()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 steps and 2 channels (4 in the backward): short sequences cross tile boundaries."""
    for name, value in (('INFER_BLOCK_T', 8), ('TRAIN_BLOCK_T', 8), ('INFER_BLOCK_D', 2), ('TRAIN_BLOCK_D', 2),
                        ('BWD_BLOCK_D', 4)):
        monkeypatch.setattr(tb, name, value)


def make_inputs(batch=2, dim=8, length=21, n=4, b_groups=2, c_groups=2, seed=0, dtype=torch.float32):
    """Random scan inputs; B and C get ``*_groups`` groups (0: the shared (batch, N, L) layout)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def bc(k):
        return rnd(batch, k, n, length) if k else rnd(batch, n, length)

    t = {'u': rnd(batch, dim, length), 'delta': rnd(batch, dim, length),
         'A': -(torch.rand(dim, n, generator=g, dtype=torch.float64) * 4 + 0.01), 'B': bc(b_groups),
         'C': bc(c_groups), 'D': rnd(dim), 'z': rnd(batch, dim, length), 'delta_bias': rnd(dim) - 1}
    return {k: v.to(DEVICE, dtype) for k, v in t.items()}


def check(inputs, rtol=1e-5, **options):
    """Output, last state and all gradients of the triton backend against the float64 reference."""
    y, last, grads = scan_with_grads(tb.scan, inputs, **options)
    y64, last64, grads64 = scan_with_grads(selective_scan_reference, {k: v.double() for k, v in inputs.items()},
                                           **options)
    assert y.dtype == inputs['u'].dtype
    assert_close(y, y64, rtol, 'y')
    if last64 is not None:
        assert last.dtype == torch.float32
        assert_close(last, last64, rtol, 'last state')
    assert grads.keys() == grads64.keys()
    for k in grads64:
        assert_close(grads[k], grads64[k], rtol, f'd{k}')


@pytest.mark.parametrize('options', SCAN_OPTION_CASES)
def test_every_option_matches_float64_reference(small_tiles, options):
    inputs = make_inputs(length=21, seed=1)
    if not options['softplus']:  # delta is a positive step without softplus
        inputs['delta'] = inputs['delta'].abs() * 0.3
        inputs['delta_bias'] = inputs['delta_bias'].abs() * 0.1
    check(inputs, **options)


@pytest.mark.parametrize('length', [1, 7, 8, 9, 16, 17])
def test_lengths_around_tiles_match_float64_reference(small_tiles, length):
    check(make_inputs(length=length, seed=length))


@pytest.mark.parametrize('chunks', [2, 3])
@pytest.mark.parametrize('length', [17, 40])
def test_time_chunks_match_float64_reference(small_tiles, monkeypatch, chunks, length):
    """The forward cut into chunks stitched by the fix-up kernel (as for batch 1 on a large GPU): outputs, the
    last state and the saved tile states (through the gradients) stay exact."""
    monkeypatch.setattr(tb, 'FORCE_CHUNKS', chunks)
    check(make_inputs(length=length, seed=chunks + length))
    with torch.no_grad():  # inference path: larger tiles are not involved, the fix-up is
        inputs = make_inputs(length=length, seed=5)
        y, last = tb.scan(*(inputs[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')), True, True)
        y64, last64 = selective_scan_reference(*(inputs[k].double() for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z',
                                                                                'delta_bias')), True, True)
    assert_close(y, y64, name='y (inference)')
    assert_close(last, last64, name='last state (inference)')


@pytest.mark.parametrize('layout', [(4, 4, 16), (0, 2, 3), (1, 0, 5)], ids=['G4-N16', 'shared-B-N3', 'shared-C-N5'])
def test_group_layouts_and_state_sizes(small_tiles, layout):
    """B/C grouped (MambaIR's four directions) or shared by all channels (MambaIRv2's one direction); N not
    a power of two (padded lanes)."""
    b_groups, c_groups, n = layout
    check(make_inputs(dim=8, n=n, b_groups=b_groups, c_groups=c_groups, length=13, seed=n))


def test_shipped_tile_sizes(monkeypatch):
    """The constants a GPU runs (tiles of 64 / 32 steps, 4 / 8 channels), with 12 channels per group (blocks
    of 4) and a sequence ending inside a tile."""
    check(make_inputs(batch=1, dim=24, n=4, length=70, seed=9))


@pytest.mark.parametrize('b_groups', [2, 0], ids=['grouped', 'shared'])
def test_deterministic_gradients(small_tiles, monkeypatch, b_groups):
    """With torch.use_deterministic_algorithms(True) dB and dC are summed from per-block buffers (no atomics):
    the same gradients as the atomic sums, and bit for bit the same in every run."""
    inputs = make_inputs(dim=16, length=9, b_groups=b_groups, seed=6)  # 2 (grouped) or 4 blocks add up
    _, _, atomic = scan_with_grads(tb.scan, inputs)
    monkeypatch.setattr(torch, 'are_deterministic_algorithms_enabled', lambda: True)
    _, _, first = scan_with_grads(tb.scan, inputs)
    _, _, second = scan_with_grads(tb.scan, inputs)
    for k in first:
        assert torch.equal(first[k], second[k]), k
        assert_close(first[k], atomic[k], 1e-6, f'd{k}')


def test_gradient_from_last_state_only(small_tiles):
    inputs = make_inputs(length=19, seed=4)
    kw = dict(delta_bias=inputs['delta_bias'], delta_softplus=True, return_last_state=True)
    grads = []
    for fn, dtype in ((tb.scan, torch.float32), (selective_scan_reference, torch.float64)):
        leaves = [inputs[k].to(dtype).requires_grad_() for k in ('u', 'delta', 'A', 'B')]
        _, last = fn(*leaves, inputs['C'].to(dtype), **{k: (v.to(dtype) if torch.is_tensor(v) else v)
                                                        for k, v in kw.items()})
        grads.append(torch.autograd.grad(last.sum(), leaves))
    for name, g, g64 in zip('u delta A B'.split(), *grads):
        assert_close(g, g64, name=name)


def test_strided_inputs_are_read_in_place(small_tiles):
    """B and C as slices of one projection (as SS2D makes them), u and delta transposed views: the same
    results as contiguous copies, bit for bit."""
    t = make_inputs(length=21, n=4, seed=2)
    batch, dim, length = t['u'].shape
    proj = torch.randn(batch, 2, 3 + 2 * 4, length, device=DEVICE)  # (batch, G, dt_rank + 2N, L)
    B, C = proj[:, :, 3:7], proj[:, :, 7:]
    u_t = t['u'].transpose(1, 2).contiguous().transpose(1, 2)
    delta = torch.stack([t['delta'], -t['delta']], dim=-1)[..., 0]
    assert not (B.is_contiguous() or u_t.is_contiguous() or delta.is_contiguous())
    rest = dict(D=t['D'], z=t['z'], delta_bias=t['delta_bias'], delta_softplus=True, return_last_state=True)
    for mode in (torch.no_grad, torch.enable_grad):
        with mode():
            strided = tb.scan(u_t, delta, t['A'], B, C, **rest)
            dense = tb.scan(t['u'], t['delta'], t['A'], B.contiguous(), C.contiguous(), **rest)
        assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(small_tiles, dtype):
    """16-bit inputs are read as they are and scanned in float32: the float32 result of the same values."""
    t = {k: v.to(dtype) for k, v in make_inputs(length=13, seed=3).items()}
    args = [t[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')]
    with torch.no_grad():
        y, last = tb.scan(*args, True, True)
        y32, last32 = tb.scan(*(a.float() for a in args), True, True)
    assert y.dtype == dtype and last.dtype == torch.float32
    assert torch.equal(y, y32.to(dtype)) and torch.equal(last, last32)
    leaves = [a.detach().requires_grad_() for a in args[:5]]
    tb.scan(*leaves, delta_softplus=True).float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == dtype and torch.isfinite(a.grad).all() for a in leaves)


def test_float64_runs_the_torch_backend(small_tiles):
    t = make_inputs(length=9, dtype=torch.float64)
    args = [t[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D')]
    assert torch.equal(tb.scan(*args, delta_softplus=True), ss.chunked.scan(*args, delta_softplus=True))


def test_unavailable_without_triton_or_gpu(monkeypatch):
    """Where Triton does not import, or (outside the interpreter) no GPU exists, the reason is one line."""
    monkeypatch.setattr(tb, '_kernels', None)
    monkeypatch.delitem(sys.modules, KERNELS)
    monkeypatch.delattr(ss, 'triton_kernels')  # else `from . import triton_kernels` finds the loaded one
    monkeypatch.setitem(sys.modules, 'triton', None)  # importing it raises ImportError
    tb.reset()
    with pytest.raises(KernelUnavailable, match='triton does not import'):
        tb.load()
    assert 'triton does not import' in tb.unavailable_reason()  # remembered
    monkeypatch.delenv('TRITON_INTERPRET')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    tb.reset()
    assert tb.unavailable_reason() == 'no CUDA GPU (the triton backend scans CUDA tensors)'
    tb.reset()


@pytest.mark.skipif(DEVICE == 'cuda', reason='on a GPU the tests above compile and run the kernels themselves')
def test_kernels_compile_for_a_gpu_without_spilling(tmp_path):
    """The kernels, with the shipped tiles, compile for an H100-class GPU (sm_90) here, without a GPU, and keep
    their tiles in registers: the interpreter accepts code that the compiler rejects (benchmarks/
    triton_registers.py; in a fresh process, as the compiler is off while TRITON_INTERPRET=1)."""
    env = cli_env()
    env.pop('TRITON_INTERPRET', None)
    out = tmp_path / 'registers.json'
    proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'triton_registers.py'), '--arch', '90', '--json',
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report) == 5 and all(r['spill_bytes'] == 0 and r['registers'] <= 255 for r in report.values()), report
