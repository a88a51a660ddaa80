"""Exporting MambaIR / MambaIRUNet networks to ONNX graphs of standard operators: :func:`export_onnx`.

How (numbers and the alternatives measured: the README's "Deploying: ONNX"):

1. ``torch.onnx.export`` traces the network; every selective scan becomes one placeholder node
   (:mod:`basicsr_mambair.ops.scan.onnx_node`). The exporter is the TorchScript one (``dynamo=False``), which
   torch 2.14 still ships though deprecated: it exports the official light SR network in ~15 s where the
   ``torch.export``-based one (``dynamo=True``, needs ``onnxscript``) takes ~10x longer; both are supported
   (``exporter=``), and ``'auto'`` falls back to the latter where the former is gone.
2. :func:`inline_scans` defines each placeholder as an ONNX function of standard operators
   (:mod:`.scan_graph`: three ``Scan`` loops over a chunked time axis, float32) and inlines it.
3. The graph is checked (``onnx.checker``, every op in the standard ONNX domain), tagged with metadata
   (``mambair.*``: arch, scale, channels, input size, precision), optionally run with ONNX Runtime on a real
   image against PyTorch (:func:`~.onnx_runtime.check_against_torch`), and written atomically.

Graph input ``input``: float32 (batch, C, H, W), RGB (or gray for 1-channel networks) in [0, 1]; output
``output``: float32 (batch, C, s*H, s*W), not clamped. Batch is always dynamic; H and W are either fixed at
export (``size``) or dynamic (any size, at least :func:`min_side` pixels). MambaIRUNet pads to multiples of
8 inside the graph (reflection, as in PyTorch), so no size multiple is required of the input.
"""

from __future__ import annotations

import copy
import io
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ExportError
from ..ops.scan.onnx_node import DOMAIN, ScanVariant
from .onnx_runtime import METADATA_PREFIX, check_against_torch

__all__ = ['DEFAULT_OPSET', 'EXPORTERS', 'ExportResult', 'export_onnx', 'inline_scans', 'min_side',
           'nonstandard_ops', 'require_onnx']

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; every maintained runtime has it
EXPORTERS = ('auto', 'torchscript', 'dynamo')
OPSETS = {'torchscript': (17, 20), 'dynamo': (18, 23)}  # what each exporter writes (inclusive; dynamo's own >= 18)
TRACE_SIDE = 32  # side of the example input traced for a dynamic-size graph (small: tracing runs a forward)


def require_onnx(runtime: bool = False) -> None:
    """Raise ExportError naming the missing packages (``onnx``; with ``runtime`` also ``onnxruntime``)."""
    import importlib.util

    names = ['onnx', 'onnxruntime'] if runtime else ['onnx']
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ExportError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                          "pip install 'basicsr-mambair[onnx]'")


def min_side(arch_type: str) -> int:
    """The smallest height/width an exported graph of ``arch_type`` takes.

    MambaIRUNet pads to multiples of 8 by reflection, which needs the pad (at most 7) below the side.
    """
    return 5 if arch_type == 'MambaIRUNet' else 1


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote.

    ``size`` is (H, W) of a static graph or None for a dynamic one; ``check`` the ONNX Runtime comparison
    when one ran (:class:`~.onnx_runtime.CheckResult`).
    """

    path: str
    arch_type: str
    name: str
    scale: int
    in_channels: int
    out_channels: int
    size: tuple[int, int] | None
    precision: str
    opset: int
    exporter: str
    seconds: float
    file_bytes: int
    check: Any = None

    def describe(self) -> str:
        size = f'{self.size[0]}x{self.size[1]}' if self.size else 'dynamic size'
        return (f'{self.name} -> {self.path} ({self.file_bytes / 1e6:.1f} MB, {size}, {self.precision}, '
                f'opset {self.opset}, {self.exporter} exporter, {self.seconds:.1f} s)')


class _Exported(nn.Module):
    """What is traced: float32 in, float32 out; an fp16 network gets its input cast to half and its output back."""

    def __init__(self, net: nn.Module, half: bool) -> None:
        super().__init__()
        self.net = net
        self.half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half()).float() if self.half else self.net(x)


def _from_module(net: nn.Module):
    """A RestoreModel around a network object (its own arguments, e.g. img_range, kept), on the CPU in eval mode."""
    from ..api import RestoreModel

    arch_type = type(net).__name__
    in_channels = getattr(net, 'in_chans', getattr(net, 'inp_channels', None))
    if in_channels is None:
        raise ExportError(f'cannot export a {arch_type}: not a network of this package (MambaIR, MambaIRUNet)')
    out_channels = getattr(net, 'out_channels', in_channels)
    heads = ('pixelshuffle', 'pixelshuffledirect')
    scale = int(getattr(net, 'upscale', 1)) if getattr(net, 'upsampler', '') in heads else 1
    if net.training or any(p.device.type != 'cpu' or p.dtype != torch.float32 for p in net.parameters()):
        net = copy.deepcopy(net).float().cpu().eval()
    return RestoreModel(net=net, arch_type=arch_type, kwargs={}, scale=scale, in_channels=int(in_channels),
                        out_channels=int(out_channels), device=torch.device('cpu'), source='the network given')


def _load(model: Any, task: str | None, opt: Any, param_key: str):
    """A :class:`~basicsr_mambair.api.RestoreModel` on the CPU, float32, from anything export_onnx takes."""
    from ..api import RestoreModel, load_model

    if isinstance(model, RestoreModel):
        if model.device.type == 'cpu' and model.precision == 'fp32':
            return model
        moved = copy.copy(model)
        moved.net, moved.device, moved.precision = copy.deepcopy(model.net).float().cpu(), torch.device('cpu'), 'fp32'
        return moved
    if isinstance(model, nn.Module):
        return _from_module(model)
    if isinstance(model, (str, os.PathLike, Mapping)):
        return load_model(model, task=task, opt=opt, device='cpu', param_key=param_key)
    raise ExportError(f'cannot export a {type(model).__name__}: give a checkpoint path, a state dict, '
                      'a network or a load_model() result')


def _pick_exporter(exporter: str) -> str:
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r} (use {', '.join(EXPORTERS)})")
    if exporter == 'auto':
        from torch.onnx import _internal

        has_torchscript = hasattr(_internal, 'torchscript_exporter')
        exporter = 'torchscript' if has_torchscript else 'dynamo'
    if exporter == 'dynamo':
        import importlib.util

        if importlib.util.find_spec('onnxscript') is None:
            raise ExportError("the dynamo exporter needs onnxscript: pip install onnxscript (or use the "
                              "torchscript exporter)")
    return exporter


def _trace(module: nn.Module, example: torch.Tensor, exporter: str, opset: int, dynamic: bool,
           min_hw: int) -> bytes:
    """The serialized ONNX model straight from torch.onnx.export (scans still placeholders)."""
    with warnings.catch_warnings(), torch.no_grad():
        # Deprecation of the TorchScript exporter, tracer warnings about Python values taken as constants
        # (the sizes that stay symbolic are checked by the tests at other sizes), onnxscript notes.
        warnings.simplefilter('ignore')
        if exporter == 'torchscript':
            axes = {0: 'batch', 2: 'height', 3: 'width'} if dynamic else {0: 'batch'}
            out_axes = {0: 'batch', 2: 'out_height', 3: 'out_width'} if dynamic else {0: 'batch'}
            buffer = io.BytesIO()
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset, input_names=['input'],
                              output_names=['output'], dynamic_axes={'input': axes, 'output': out_axes})
            return buffer.getvalue()
        example = example.expand(2, -1, -1, -1)  # torch.export fixes dimensions of size 1
        dim = torch.export.Dim
        shapes = {0: dim('batch', min=1, max=1024)}
        if dynamic:
            shapes.update({2: dim('height', min=max(2, min_hw), max=1 << 16),
                           3: dim('width', min=max(2, min_hw), max=1 << 16)})
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, input_names=['input'],
                                    output_names=['output'], dynamic_shapes=({**shapes},), verbose=False)
        return program.model_proto.SerializeToString()


def _all_nodes(graph) -> list:
    """Every node of ``graph`` and of its subgraphs (loop bodies), depth first."""
    import onnx

    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    nodes += _all_nodes(sub)
    return nodes


def nonstandard_ops(model) -> list[str]:
    """``domain::op`` of every node (subgraphs included) outside the standard ONNX operator set, sorted."""
    import onnx

    found = set()
    for node in _all_nodes(model.graph):
        domain = node.domain or 'ai.onnx'
        if domain not in ('ai.onnx', '') or not onnx.defs.has(node.op_type, ''):
            found.add(f'{domain}::{node.op_type}')
    return sorted(found)


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))


def inline_scans(model):
    """Replace every ``mambair.SelectiveScan*`` placeholder of an exported ModelProto by standard ONNX ops.

    For graphs from your own ``torch.onnx.export`` of a network of this package; :func:`export_onnx` calls it.
    Other model-local functions (the dynamo exporter's) are inlined too. Returns a new ModelProto.
    """
    import onnx
    import onnx.inliner

    from .scan_graph import scan_function

    opset = _opset(model)
    if opset < 16:
        raise ExportError(f'the scan needs ONNX opset >= 16 (Scan-16); this graph is opset {opset}')
    model = copy.deepcopy(model)
    variants = sorted({n.op_type for n in _all_nodes(model.graph) if n.domain == DOMAIN})
    functions = {(f.domain, f.name) for f in model.functions}
    for op_type in variants:
        if (DOMAIN, op_type) not in functions:
            model.functions.append(scan_function(ScanVariant.from_op_type(op_type), opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    model = onnx.inliner.inline_local_functions(model)
    used = {n.domain for n in _all_nodes(model.graph)}
    keep = [o for o in model.opset_import if o.domain in ('', 'ai.onnx') or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def _set_metadata(model, values: Mapping[str, Any]) -> None:
    import onnx

    props = {p.key: p.value for p in model.metadata_props}
    props.update({METADATA_PREFIX + k: str(v) for k, v in values.items()})
    onnx.helper.set_model_props(model, props)


def _parse_size(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ExportError(f'size must be (height, width), got {size!r}') from None
    return h, w


def export_onnx(model: Any, path: str | os.PathLike, *, size: int | tuple[int, int] | None = None,
                dynamic: bool | None = None, fp16: bool = False, opset: int | None = None, exporter: str = 'auto',
                task: str | None = None, opt: Any = None, param_key: str = 'params', overwrite: bool = False,
                check_image: str | os.PathLike | None = None, tolerance: float | None = None,
                provider: str = 'cpu') -> ExportResult:
    """Export a MambaIR / MambaIRUNet network to an ONNX file of standard operators.

    Args:
        model: a checkpoint file or state dict (the network is inferred from its weights, or built from
            ``task``/``opt``, as :func:`basicsr_mambair.load_model`), a network, or a ``load_model`` result.
        path: the ``.onnx`` file to write (atomically; an existing file only with ``overwrite``).
        size: (H, W) of a static graph (an int for squares); None with ``dynamic`` unset: dynamic.
        dynamic: any input size (at least :func:`min_side` pixels). Default: dynamic unless ``size`` is given.
        fp16: half-precision weights and activations (float32 graph input/output), for GPUs; the selective scan
            and its parameters (A, D, dt bias) stay float32, as in PyTorch (SS2D casts). Check tolerance 1e-2.
        opset: ONNX opset: 17-20 with the TorchScript exporter, 18-23 with dynamo; default the lowest.
        exporter: ``'auto'`` (TorchScript where torch has it, else dynamo), ``'torchscript'`` or ``'dynamo'``.
        task, opt, param_key: how to read a checkpoint, as :func:`basicsr_mambair.load_model`.
        overwrite: replace an existing ``path``.
        check_image: an image file; ONNX Runtime runs the graph on it (center-cropped to a static size) and the
            largest absolute difference to PyTorch's float32 output must stay within ``tolerance`` (default
            1e-4, fp16 1e-2), else :class:`~basicsr_mambair.errors.CheckFailed` and nothing is written.
        provider: ONNX Runtime provider of the check, ``'cpu'`` or ``'cuda'``.

    Raises:
        ExportError: missing packages, bad arguments, an export that fails or leaves non-standard ops.
        CheckFailed: the ONNX Runtime output differs from PyTorch by more than ``tolerance``.
        CheckpointError, RestoreError, FileNotFoundError: as :func:`basicsr_mambair.load_model`.
        FileExistsError: ``path`` exists and not ``overwrite``.
    """
    require_onnx(runtime=check_image is not None)
    import onnx

    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f'{path} exists')
    if dynamic is None:
        dynamic = size is None
    if dynamic and size is not None:
        raise ExportError('give either a static size or dynamic, not both')
    exporter = _pick_exporter(exporter)
    low, high = OPSETS[exporter]
    opset = low if opset is None else opset
    if not low <= opset <= high:
        raise ExportError(f'opset {opset} is not supported by the {exporter} exporter (use {low}-{high})')
    rm = _load(model, task, opt, param_key)
    smallest = min_side(rm.arch_type)
    hw = (TRACE_SIDE, TRACE_SIDE) if dynamic else _parse_size(size)
    if min(hw) < smallest:
        raise ExportError(f'size {hw[0]}x{hw[1]} is below the {smallest}-pixel minimum of {rm.arch_type}')

    start = time.perf_counter()
    net = copy.deepcopy(rm.net).half() if fp16 else rm.net
    example = torch.rand(1, rm.in_channels, *hw, generator=torch.Generator().manual_seed(0))
    try:
        raw = _trace(_Exported(net, fp16).eval(), example, exporter, opset, dynamic, smallest)
    except Exception as exc:  # noqa: BLE001  (an exporter failure, with its own long message: one line)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
        raise ExportError(f'torch.onnx.export ({exporter}) failed: {type(exc).__name__}: {first}') from exc
    graph = inline_scans(onnx.load_from_string(raw))
    leftover = nonstandard_ops(graph)
    if leftover:
        raise ExportError(f"the exported graph has non-standard ops: {', '.join(leftover)}")
    precision = 'fp16' if fp16 else 'fp32'
    graph.doc_string = (f'{rm.arch_type} ({rm.name}): input float32 (batch, {rm.in_channels}, H, W) in [0, 1] '
                        f'{"RGB" if rm.in_channels == 3 else "gray"}; output float32 (batch, {rm.out_channels}, '
                        f'{rm.scale}H, {rm.scale}W), not clamped. Exported by basicsr-mambair.')
    _set_metadata(graph, {'arch': rm.arch_type, 'name': rm.name, 'scale': rm.scale,
                          'in_channels': rm.in_channels, 'out_channels': rm.out_channels,
                          'input_size': 'dynamic' if dynamic else f'{hw[0]}x{hw[1]}', 'min_side': smallest,
                          'precision': precision})
    onnx.checker.check_model(graph)
    data = graph.SerializeToString()
    seconds = time.perf_counter() - start

    check = None
    if check_image is not None:
        check = check_against_torch(data, rm, check_image, tolerance=tolerance, provider=provider)
    from ..utils.files import atomic_write_bytes

    atomic_write_bytes(path, data, overwrite=overwrite)
    return ExportResult(path=path, arch_type=rm.arch_type, name=rm.name, scale=rm.scale,
                        in_channels=rm.in_channels, out_channels=rm.out_channels, size=None if dynamic else hw,
                        precision=precision, opset=_opset(graph), exporter=exporter, seconds=seconds,
                        file_bytes=len(data), check=check)
