"""The selective scan as one ``torch.library`` custom op, so that ``torch.compile`` keeps it in one graph.

(No ``from __future__ import annotations`` here: ``torch.library`` reads the op's schema from real annotation
objects, which every supported torch version parses.)

Dynamo cannot trace our backends (ctypes, Triton launches, ``mamba_ssm``, Python-side dispatch), and a graph
break per scan would split every block of a network. :func:`scan` (what
:func:`~basicsr_mambair.ops.scan.selective_scan` calls while compiling) goes through
``basicsr_mambair::selective_scan`` instead: an opaque op with a fake implementation (output shapes and dtypes
for tracing) whose real implementation runs the eager dispatcher, so every backend works compiled, on CPU and
CUDA alike. Its gradient is a second op, ``basicsr_mambair::selective_scan_backward``, which recomputes the
scan with autograd through the same backend and returns the gradients of its inputs (one forward more than
eager training, in exchange for opacity).
"""

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .common import ScanOut, check_shapes, compute_dtype
from .dispatch import run

__all__ = ['compiling', 'scan']

NAMESPACE = 'basicsr_mambair'
# gradient order of the backward op: the tensor inputs that can take a gradient
GRAD_INPUTS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')

_is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', lambda: False)
_custom_op = getattr(torch.library, 'custom_op', None)  # torch >= 2.4


def compiling() -> bool:
    """Whether Dynamo is tracing the caller (and the custom op exists in this torch)."""
    return _custom_op is not None and _is_compiling()


def _eager(*args) -> ScanOut:
    return run(*args)


def _last_state_like(u: Tensor, n: int, wanted: bool) -> Tensor:
    """The op's second output: the last state (batch, dim, N), or an empty tensor when not asked for."""
    shape = (u.shape[0], u.shape[1], n) if wanted else (0,)
    return u.new_empty(shape, dtype=compute_dtype(u.dtype))


def _fresh(t: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """``t``, copied if it shares memory with one of ``inputs`` (an op's outputs must not alias its inputs)."""
    ptr = t.untyped_storage().data_ptr()
    if any(i is not None and i.untyped_storage().data_ptr() == ptr for i in inputs):
        return t.clone()
    return t


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Record autograd inside an op implementation (which PyTorch runs with the autograd dispatch keys
    excluded): the backward recomputes the scan with autograd. Autocast stays off (the scan is float32)."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradFunctionality, C.DispatchKey.AutogradOther, C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


if _custom_op is not None:
    @_custom_op(f'{NAMESPACE}::selective_scan', mutates_args=())
    def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, return_last_state: bool,
                 backend: Optional[str]) -> Tuple[Tensor, Tensor]:
        out = _eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend)
        y, last = out if return_last_state else (out, _last_state_like(u, A.shape[1], False))
        return _fresh(y.to(u.dtype).contiguous(), u, delta, B, C, z), last.contiguous()

    @_scan_op.register_fake
    def _scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend):
        check_shapes(u, delta, A, B, C)
        return torch.empty_like(u, memory_format=torch.contiguous_format), _last_state_like(u, A.shape[1],
                                                                                            return_last_state)

    @_custom_op(f'{NAMESPACE}::selective_scan_backward', mutates_args=())
    def _backward_op(dy: Tensor, dlast: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                     return_last_state: bool, backend: Optional[str]) -> List[Tensor]:
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        with _autograd_inside_op():
            leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
            out = _eager(*leaves, delta_softplus, return_last_state, backend)
            outputs, grads = ([out[0], out[1]], [dy, dlast]) if return_last_state else ([out], [dy])
            used = [t for t in leaves if t is not None]
            found = iter(torch.autograd.grad(outputs, used, grads, allow_unused=True))
        result = []
        for t in leaves:  # absent inputs get an empty tensor (an op cannot return None)
            if t is None:
                result.append(dy.new_empty(0))
                continue
            grad = next(found)
            grad = t.new_zeros(t.shape) if grad is None else grad.to(t.dtype).contiguous()
            result.append(_fresh(grad, dy, dlast, *inputs))
        return result

    @_backward_op.register_fake
    def _backward_fake(dy, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend):
        return [dy.new_empty(0) if t is None else t.new_empty(t.shape) for t in (u, delta, A, B, C, D, z, delta_bias)]

    def _setup_context(ctx, inputs, output) -> None:
        *tensors, softplus, last_state, backend = inputs
        ctx.save_for_backward(*tensors)
        ctx.options = (softplus, last_state, backend)

    def _backward(ctx, dy: Tensor, dlast: Tensor):
        tensors = ctx.saved_tensors
        grads = _backward_op(dy, dlast, *tensors, *ctx.options)
        return (*(None if t is None else g for t, g in zip(tensors, grads)), None, None, None)

    _scan_op.register_autograd(_backward, setup_context=_setup_context)


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
         delta_bias: Optional[Tensor], delta_softplus: bool, return_last_state: bool,
         backend: Optional[str]) -> ScanOut:
    """:func:`~basicsr_mambair.ops.scan.selective_scan` through the custom op (same arguments and results)."""
    y, last = _scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend)
    return (y, last) if return_last_state else y
