"""The scan during ``torch.onnx.export``: one placeholder node ``mambair.SelectiveScan*`` per call.

Neither ONNX exporter can trace our backends (the TorchScript one fails inside the ``torch`` backend's
autograd.Function with ``unordered_map::at``; a traced Python loop would unroll into L * ops nodes), so while
:func:`torch.onnx.is_in_onnx_export` is true the dispatcher emits this node instead, and
:mod:`basicsr_mambair.deploy` replaces each one by a function of standard ONNX operators
(:mod:`basicsr_mambair.deploy.scan_graph`). A graph straight from ``torch.onnx.export`` therefore still holds
these nodes; ``basicsr_mambair.deploy.inline_scans`` finishes it.

Eager behaviour is untouched: outside an export the dispatcher never comes here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .common import ScanOut, check_shapes
from .dispatch import run

DOMAIN = 'mambair'  # the placeholder nodes' ONNX domain
OP_PREFIX = 'SelectiveScan'


@dataclass(frozen=True)
class ScanVariant:
    """Which optional parts a placeholder node has; its op type names them (one ONNX function per variant).

    Node inputs in this order: u, delta, A, B, C, then D if ``has_d``, delta_bias if ``has_bias``, z if ``has_z``.
    """

    has_d: bool = True
    has_bias: bool = True
    has_z: bool = False
    softplus: bool = True

    @property
    def op_type(self) -> str:
        parts = (('D', self.has_d), ('Bias', self.has_bias), ('Z', self.has_z), ('Softplus', self.softplus))
        return OP_PREFIX + ''.join(name for name, on in parts if on)

    @property
    def input_names(self) -> list[str]:
        optional = (('D', self.has_d), ('delta_bias', self.has_bias), ('z', self.has_z))
        return ['u', 'delta', 'A', 'B', 'C', *(name for name, on in optional if on)]

    @staticmethod
    def from_op_type(op_type: str) -> ScanVariant:
        """The variant whose :attr:`op_type` this is; ValueError for any other name."""
        for flags in range(16):
            variant = ScanVariant(*(bool(flags >> i & 1) for i in range(4)))
            if variant.op_type == op_type:
                return variant
        raise ValueError(f'not a selective-scan node: {op_type!r}')


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Suspend the TorchScript tracer: the real scan below (the compiled kernel's first-use self-check runs
    autograd) must not be recorded; the node's ``symbolic`` stands for it in the graph."""
    get_state, set_state = torch._C._get_tracing_state, torch._C._set_tracing_state
    state = get_state()
    set_state(None)
    try:
        yield
    finally:
        set_state(state)


class _TracedScan(torch.autograd.Function):
    """For the TorchScript exporter: computes the scan for the tracer's values, exports as one node."""

    @staticmethod
    def forward(ctx, op_type: str, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *optional: Tensor):
        variant = ScanVariant.from_op_type(op_type)
        rest = dict(zip(variant.input_names[5:], optional))
        with _untraced():  # the real scan, for the values the tracer carries on with
            return run(u, delta, A, B, C, rest.get('D'), rest.get('z'), rest.get('delta_bias'), variant.softplus,
                       False, 'auto')

    @staticmethod
    def symbolic(g, op_type: str, u, delta, A, B, C, *optional):
        out = g.op(f'{DOMAIN}::{op_type}', u, delta, A, B, C, *optional)
        out.setType(u.type())
        return out


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
         delta_bias: Tensor | None = None, delta_softplus: bool = False, return_last_state: bool = False) -> ScanOut:
    """The scan as a placeholder node (shapes as :func:`~basicsr_mambair.ops.scan.selective_scan`), float32.

    Works under the TorchScript exporter (``dynamo=False``) and the ``torch.export``-based one (``dynamo=True``).
    """
    if return_last_state:
        raise NotImplementedError('return_last_state is not supported in an ONNX export')
    if not torch.jit.is_tracing():  # traced: the real scan in _TracedScan.forward checks them (untraced)
        check_shapes(u, delta, A, B, C)
    variant = ScanVariant(has_d=D is not None, has_bias=delta_bias is not None, has_z=z is not None,
                          softplus=delta_softplus)
    f32 = torch.float32
    # B, C without groups are (batch, N, L): one group for all channels.
    inputs = [u.to(f32), delta.to(f32), A.to(f32), *(t.to(f32) if t.dim() == 4 else t.to(f32).unsqueeze(1)
                                                     for t in (B, C))]
    inputs += [t.to(f32) for t in (D, delta_bias, z) if t is not None]
    if torch.jit.is_tracing():
        y = _TracedScan.apply(variant.op_type, *inputs)
    else:
        y = torch.onnx.ops.symbolic(f'{DOMAIN}::{variant.op_type}', inputs, {}, dtype=f32, shape=u.shape, version=1)
    return y.to(u.dtype)
