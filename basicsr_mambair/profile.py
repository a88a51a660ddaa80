"""Parameters and multiply-adds (MACs) of a network at a given input size, the selective scan included.

FLOP tools that trace modules or TorchScript graphs (thop, fvcore) do not see the selective scan, so they
under-count Mamba networks. Here one forward runs on PyTorch's ``meta`` device (shapes only: instant, no
memory, any input size) and every operation is counted where it happens:

* aten operations, through a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, with fvcore's rules
  (one multiply-add = one MAC): convolutions ``out.numel() * C_in / groups * k_h * k_w``, matrix products
  ``m * k * n`` (``nn.Linear``, ``torch.matmul``, einsum, attention), LayerNorm / GroupNorm
  ``5 * numel`` (4 without affine), eval BatchNorm ``2 * numel``, nearest / bilinear upsampling 1 / 4 per
  output value; element-wise operations (activations, additions, scalings) are not counted;
* modules whose aten form hides them, by forward hooks on the module type: adaptive average pooling (one
  add per input value, as fvcore; PyTorch runs a 1 x 1 pooling as ``mean``);
* the selective scan, by :func:`basicsr_mambair.ops.scan.dispatch.observe` around each call, for u of shape
  (B, D, L) and a state of size N:

  - ``exp``: B·D·L·N exponentials (the discretisation ``exp(dt * A)``, one per step and state);
  - MACs: per step and state the product ``dt * A``, the input ``(dt * u) * B``, the state update
    ``h = exp(dt A) * h + dt u B`` (one multiply-add) and the output contraction ``y += C * h`` (one
    multiply-add): 4·B·D·L·N; per step ``dt * u`` and, where given, the skip ``+ D * u`` and the gate
    ``* silu(z)``: (1 + [D] + [z])·B·D·L;
  - the published convention, ``9·B·L·D·N`` plus ``B·D·L`` for D and for z (VMamba's
    ``flops_selective_scan_fn``, which the official MambaIR ``analysis/flops_param_fvcore.py`` registers
    for the scan; with fvcore's counts of the other operations this is the MACs column of the MambaIRv2
    paper, measured for an HR output of 1280 x 720, i.e. an input of 720 // s x 1280 // s).

Counts are attributed to the network's top-level children (e.g. ``conv_first``, ``layers``, ``upsample``),
so the body (the part a "backbone" count covers) and the whole network can be read side by side.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .ops.scan.dispatch import ScanCall, observe

__all__ = ['CATEGORIES', 'Profile', 'profile_config', 'profile_network', 'scan_counts']

# what the MAC counts are split into, in display order
CATEGORIES = ('conv', 'matmul', 'norm', 'pool', 'upsample', 'scan')
PUBLISHED_SCAN_FACTOR = 9  # MACs per (batch, channel, step, state) in VMamba's flops_selective_scan_fn
ROOT = '(top level)'  # operations in the network's own forward, outside every child module

aten = torch.ops.aten


def scan_counts(call: ScanCall) -> tuple[int, int, int]:
    """(MACs, exponentials, MACs by the published convention) of one selective scan call (module docstring)."""
    per_step = call.batch * call.dim * call.length
    extra = int(call.skip) + int(call.gate)
    macs = per_step * (4 * call.state + 1 + extra)
    return macs, per_step * call.state, per_step * (PUBLISHED_SCAN_FACTOR * call.state + extra)


def _numel(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _conv(args: tuple, out: torch.Tensor) -> int:
    x, w = args[0], args[1]
    if bool(args[6]):  # weight (C_in, C_out / groups, k...): every input value meets C_out / groups * k... weights
        return x.shape[0] * _numel(w.shape) * _numel(x.shape[2:])
    return out.numel() * w.shape[1] * _numel(w.shape[2:])


def _norm(x: torch.Tensor, weight: torch.Tensor | None) -> int:
    return x.numel() * (5 if weight is not None else 4)


# aten op -> (category, MACs from (args, output))
_RULES: dict[Any, tuple[str, Callable[[tuple, Any], int]]] = {
    aten.convolution.default: ('conv', _conv),
    aten.mm.default: ('matmul', lambda a, o: a[0].shape[0] * a[0].shape[1] * a[1].shape[1]),
    aten.addmm.default: ('matmul', lambda a, o: a[1].shape[0] * a[1].shape[1] * a[2].shape[1]),
    aten.bmm.default: ('matmul', lambda a, o: a[0].shape[0] * a[0].shape[1] * a[0].shape[2] * a[1].shape[2]),
    aten.baddbmm.default: ('matmul', lambda a, o: a[1].shape[0] * a[1].shape[1] * a[1].shape[2] * a[2].shape[2]),
    aten.native_layer_norm.default: ('norm', lambda a, o: _norm(a[0], a[2] if len(a) > 2 else None)),
    aten.native_group_norm.default: ('norm', lambda a, o: _norm(a[0], a[1])),
    aten._native_batch_norm_legit_no_training.default: (
        'norm', lambda a, o: a[0].numel() * (2 if a[1] is not None else 1)),
    aten.upsample_nearest2d.default: ('upsample', lambda a, o: o.numel()),
    aten.upsample_bilinear2d.default: ('upsample', lambda a, o: 4 * o.numel()),
}
# modules counted by a forward hook (input -> MACs), because their aten form is an uncounted element-wise op
_MODULE_RULES: dict[type, tuple[str, Callable[[torch.Tensor], int]]] = {
    nn.AdaptiveAvgPool1d: ('pool', lambda x: x.numel()),
    nn.AdaptiveAvgPool2d: ('pool', lambda x: x.numel()),
    nn.AdaptiveAvgPool3d: ('pool', lambda x: x.numel()),
}


@dataclass
class Profile:
    """What :func:`profile_network` counted.

    Attributes:
        params: ``sum(p.numel() for p in net.parameters())`` (buffers excluded, as published counts).
        input_shape / output_shape: (C, H, W) of one image.
        macs: {part: Counter(category -> MACs)} with parts the top-level children in call order
            (:data:`ROOT` for operations of the network's own ``forward``) and categories :data:`CATEGORIES`.
        scan_exp: {part: exponentials of the selective scan}.
        scan_published: {part: scan MACs by the published 9·B·L·D·N convention}.
        scan_calls: number of selective scan calls.
    """

    params: int
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    macs: dict[str, Counter] = field(default_factory=dict)
    scan_exp: dict[str, int] = field(default_factory=dict)
    scan_published: dict[str, int] = field(default_factory=dict)
    scan_calls: int = 0

    @property
    def parts(self) -> list[str]:
        return list(self.macs)

    def without_scan(self, part: str | None = None) -> int:
        """MACs of everything but the scan (what module- or graph-tracing tools count), of ``part`` or all."""
        return sum(n for p in self._parts(part) for c, n in self.macs[p].items() if c != 'scan')

    def scan(self, part: str | None = None) -> int:
        """MACs of the selective scan by our count."""
        return sum(self.macs[p]['scan'] for p in self._parts(part))

    def total(self, part: str | None = None) -> int:
        """All MACs, the scan by our count."""
        return self.without_scan(part) + self.scan(part)

    def published(self, part: str | None = None) -> int:
        """All MACs with the scan by the published convention (the MambaIRv2 paper's MACs column)."""
        return self.without_scan(part) + sum(self.scan_published.get(p, 0) for p in self._parts(part))

    def by_category(self) -> Counter:
        total: Counter = Counter()
        for counts in self.macs.values():
            total.update(counts)
        return total

    def _parts(self, part: str | None) -> list[str]:
        if part is None:
            return self.parts
        if part not in self.macs:
            raise KeyError(f'no part {part!r} (parts: {", ".join(self.parts)})')
        return [part]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (integers)."""
        return {
            'params': self.params, 'input_shape': list(self.input_shape), 'output_shape': list(self.output_shape),
            'scan_calls': self.scan_calls,
            'parts': {p: {'by_category': dict(self.macs[p]), 'without_scan': self.without_scan(p),
                          'scan': self.scan(p), 'scan_exp': self.scan_exp.get(p, 0), 'total': self.total(p),
                          'published': self.published(p)} for p in self.parts},
            'by_category': dict(self.by_category()), 'without_scan': self.without_scan(), 'scan': self.scan(),
            'scan_exp': sum(self.scan_exp.values()), 'total': self.total(), 'published': self.published(),
        }


class _Counter(TorchDispatchMode):
    """Counts aten operations into the part that is running (set by the module hooks)."""

    def __init__(self, record: Callable[[str, int], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = _RULES.get(func)
        if rule is not None:
            category, count = rule
            self.record(category, int(count(args, out)))
        return out


def profile_network(net: nn.Module, input_size: tuple[int, int], in_channels: int, batch: int = 1) -> Profile:
    """Count the parameters and MACs of ``net`` on a (batch, in_channels, H, W) input (see the module docstring).

    A copy of ``net`` on the meta device runs (``net`` itself when it is there already, then set to eval mode),
    so the input size costs neither time nor memory and ``net`` keeps its weights. Counts are for the whole
    batch.
    """
    params = sum(p.numel() for p in net.parameters())
    # parameters without values: only shapes flow through the forward
    meta = net if _on_meta(net) else copy.deepcopy(net).to('meta')
    meta.eval()
    names = {module: name for name, module in meta.named_modules()}
    stack: list[str] = []
    prof = Profile(params=params, input_shape=(in_channels, *input_size), output_shape=(0, 0, 0))

    def part() -> str:
        top = next((name for name in stack if name), '')
        return top.split('.')[0] if top else ROOT

    def record(category: str, macs: int) -> None:
        prof.macs.setdefault(part(), Counter())[category] += macs

    def on_scan(call: ScanCall) -> None:
        macs, exps, published = scan_counts(call)
        record('scan', macs)
        where = part()
        prof.scan_exp[where] = prof.scan_exp.get(where, 0) + exps
        prof.scan_published[where] = prof.scan_published.get(where, 0) + published
        prof.scan_calls += 1

    def pre_hook(module: nn.Module, inputs: tuple) -> None:
        if module in names:
            stack.append(names[module])
            if part() not in prof.macs:
                prof.macs[part()] = Counter()  # parts in call order, also those without counted operations
            rule = _MODULE_RULES.get(type(module))
            if rule is not None and inputs and isinstance(inputs[0], torch.Tensor):
                record(rule[0], int(rule[1](inputs[0])))

    def post_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        if module in names:
            stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(pre_hook),
             nn.modules.module.register_module_forward_hook(post_hook)]
    try:
        x = torch.empty(batch, in_channels, *input_size, device='meta')
        with torch.no_grad(), observe(on_scan), _Counter(record):
            y = meta(x)
    finally:
        for hook in hooks:
            hook.remove()
    prof.output_shape = tuple(y.shape[1:])
    prof.macs = {p: c for p, c in prof.macs.items() if any(c.values())}  # e.g. no dropout rows
    return prof


def _on_meta(net: nn.Module) -> bool:
    return all(t.device.type == 'meta' for t in [*net.parameters(), *net.buffers()])


def profile_config(arch_type: str, kwargs: Mapping[str, Any], input_size: tuple[int, int]) -> Profile:
    """:func:`profile_network` of ``ARCH_REGISTRY.get(arch_type)(**kwargs)`` on one image of ``input_size``."""
    from basicsr.utils.registry import ARCH_REGISTRY  # after `import basicsr_mambair` (torchvision alias)

    from .archs.support import describe

    net = ARCH_REGISTRY.get(arch_type)(**kwargs).to('meta')  # built on the CPU: some constructors need values
    return profile_network(net, input_size, describe(arch_type, kwargs).in_channels)
