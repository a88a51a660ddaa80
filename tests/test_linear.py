"""ops.linear: oneDNN's matmul for CPU float32 inference, F.linear everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from basicsr_mambair.ops import linear as linear_module
from basicsr_mambair.ops.linear import linear


@pytest.fixture
def calls(monkeypatch):
    """The names of the ops linear() ran ('onednn' or 'F.linear')."""
    available = linear_module.onednn_available()  # its one-time check runs F.linear: before the spy
    seen = []
    real_op, real_linear = torch.ops.mkldnn._linear_pointwise, F.linear
    monkeypatch.setattr(linear_module, 'F', type('F', (), {'linear': staticmethod(
        lambda *a, **k: seen.append('F.linear') or real_linear(*a, **k))}))
    if available:
        monkeypatch.setattr(linear_module.torch.ops.mkldnn, '_linear_pointwise',
                            lambda *a: seen.append('onednn') or real_op(*a), raising=False)
    return seen


def test_inference_uses_onednn_and_agrees_with_f_linear(calls):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 7, 9, 60, generator=g), torch.randn(72, 60, generator=g), torch.randn(72, generator=g)
    with torch.inference_mode():
        y = linear(x.permute(0, 2, 1, 3), w, b)  # a non-contiguous input too
    want = F.linear(x.permute(0, 2, 1, 3), w, b)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert calls[0] == ('onednn' if linear_module.onednn_available() else 'F.linear')


def test_autograd_autocast_and_other_dtypes_use_f_linear(calls):
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(3, 8)
    linear(x, w).sum().backward()  # autograd: F.linear's backward
    assert x.grad is not None
    with torch.no_grad():
        linear(x.double(), w.double())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert linear(x, w).dtype == torch.bfloat16
    assert calls == ['F.linear'] * 3


def test_missing_onednn_op_falls_back(monkeypatch):
    monkeypatch.setattr(linear_module, '_available', None)
    monkeypatch.setattr(torch.ops, 'mkldnn', object())  # a PyTorch without the op
    assert not linear_module.onednn_available()
    with torch.no_grad():
        x, w = torch.randn(5, 6), torch.randn(2, 6)
        assert torch.equal(linear(x, w), F.linear(x, w))
