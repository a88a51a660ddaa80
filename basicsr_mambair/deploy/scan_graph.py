"""The selective scan as an ONNX function of standard operators (no custom op), for exported networks.

During :func:`torch.onnx.export` every scan becomes one placeholder node ``mambair.SelectiveScan*``
(:mod:`basicsr_mambair.ops.scan.onnx_node`); :func:`scan_function` builds the ONNX function that defines it,
which :mod:`.onnx_export` inlines. The recurrence (notation of :mod:`basicsr_mambair.ops.scan`)::

    h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * u[t] * B[t],   y[t] = C[t] . h[t] + D * u[t]

runs as three ONNX ``Scan`` loops over a chunked time axis (the scheme of the ``torch`` backend, chunked.py):
time is padded to ``nc * T`` steps (``T = ceil(sqrt(L / 2))`` steps per chunk, ``nc = ceil(L / T)`` chunks);

1. sweep over the T steps of all nc chunks at once, from zero states: each chunk's local end state;
2. sweep over the nc chunks: the true start state of each (``start[c+1] = P[c] * start[c] + end[c]``, with
   ``P[c] = exp(A * sum of dt over chunk c)``);
3. sweep over the T steps again from the true starts, emitting ``y = C . h``.

So ``2 T + nc`` (about ``2.8 sqrt(L)``) loop iterations, each element-wise ops over (batch, dim, N, nc)
values, instead of L iterations over (batch, dim, N): the per-iteration overhead of a runtime's loop stays
small, and no (batch, dim, N, L) tensor is ever materialised (memory grows with L * dim, as the network's
other activations). Exponents are only ``dt * A <= 0`` and sums of them: decays, never their inverses, so
long sequences underflow to 0 gracefully. Every shape is computed in the graph, so the same function serves
static and dynamic spatial sizes.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..ops.scan.onnx_node import DOMAIN, ScanVariant


class _Graph:
    """A tiny node builder: ``g.op('Mul', a, b)`` appends a node and returns its output name."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self._count = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self._count += 1
        names = [f'{self.prefix}{op_type}_{self._count}_{i}' for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def ints(self, *values: int) -> str:
        """A constant 1-D int64 tensor."""
        return self.op('Constant', value=helper.make_tensor('v', TensorProto.INT64, [len(values)], list(values)))

    def scalar(self, value: float) -> str:
        """A constant float32 scalar."""
        return self.op('Constant', value=helper.make_tensor('v', TensorProto.FLOAT, [], [value]))

    def dim(self, shape: str, axis: int) -> str:
        """Dimension ``axis`` of a Shape output as a 1-D int64 tensor of length 1."""
        return self.op('Slice', shape, self.ints(axis), self.ints(axis + 1))


def _recurrence_body(name: str, with_output: bool) -> onnx.GraphProto:
    """Scan body of a time sweep: ``h = exp(dt * A) * h + x * B`` (and ``y = sum_N C * h`` per step).

    State h (batch, G, N, H, nc) with the chunks innermost (each op runs over rows of nc values); per-step
    inputs dt, x (batch, G, 1, H, nc), B and C (batch, G, N, 1, nc); A_gnh1 (G, N, H, 1) is read from the
    enclosing scope.
    """
    g = _Graph(f'{name}_')
    decay = g.op('Exp', g.op('Mul', 'dt_t', 'A_gnh1'))
    g.nodes.append(helper.make_node('Add', [g.op('Mul', decay, 'h_in'), g.op('Mul', 'x_t', 'B_t')], ['h_out']))
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f32, None) for n in ('h_in', 'dt_t', 'x_t', 'B_t')]
    outputs = [helper.make_tensor_value_info('h_out', f32, None)]
    if with_output:
        inputs.append(helper.make_tensor_value_info('C_t', f32, None))
        # y = sum over N of C * h: (batch, G, 1, H, nc)
        g.nodes.append(helper.make_node('ReduceSum', [g.op('Mul', 'h_out', 'C_t'), g.ints(2)], ['y_t'], keepdims=1))
        outputs.append(helper.make_tensor_value_info('y_t', f32, None))
    return helper.make_graph(g.nodes, name, inputs, outputs)


def _carry_body() -> onnx.GraphProto:
    """Scan body over chunks: emits the state entering chunk c, then ``s = P[c] * s + end[c]``."""
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node('Identity', ['s_in'], ['start_c']),
             helper.make_node('Mul', ['P_c', 's_in'], ['carried']),
             helper.make_node('Add', ['carried', 'end_c'], ['s_out'])]
    return helper.make_graph(
        nodes, 'chunk_carry', [helper.make_tensor_value_info(n, f32, None) for n in ('s_in', 'P_c', 'end_c')],
        [helper.make_tensor_value_info(n, f32, None) for n in ('s_out', 'start_c')])


def _softplus(g: _Graph, x: str) -> str:
    """softplus(x) = max(x, 0) + log(1 + exp(-|x|)) from element-wise ops.

    Within 6e-8 of mamba_ssm's thresholded softplus (above 20 the log term is below float32's resolution of x;
    below -17 the result rounds to 0 instead of exp(x), a step that changes no state); written out because
    ONNX Runtime's ``Softplus`` kernel took about 4x as long as these element-wise passes.
    """
    return g.op('Add', g.op('Relu', x), g.op('Log', g.op('Add', g.op('Exp', g.op('Neg', g.op('Abs', x))),
                                                          g.scalar(1.0))))


def scan_function(variant: ScanVariant, opset: int) -> onnx.FunctionProto:
    """The ONNX function ``mambair.<variant.op_type>``: y (batch, dim, L) from the variant's inputs.

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, G, N, L) with dim = G * H (channel block k
    uses group k); D, delta_bias (dim,). Everything in float32; ``opset`` is the model's ONNX opset (>= 16).
    """
    g = _Graph('ss_')
    shape_u, shape_b = g.op('Shape', 'u'), g.op('Shape', 'B')
    batch, dim, length = (g.dim(shape_u, i) for i in range(3))
    groups, n = g.dim(shape_b, 1), g.dim(shape_b, 2)
    per_group = g.op('Div', dim, groups)
    # T = max(1, ceil(sqrt(L / 2))) steps per chunk, nc = ceil(L / T) chunks: 2T + nc loop iterations.
    half = g.op('Div', g.op('Cast', length, to=TensorProto.FLOAT), g.scalar(2.0))
    chunk = g.op('Max', g.op('Cast', g.op('Ceil', g.op('Sqrt', half)), to=TensorProto.INT64), g.ints(1))
    chunks = g.op('Div', g.op('Sub', g.op('Add', length, chunk), g.ints(1)), chunk)
    pad = g.op('Sub', g.op('Mul', chunks, chunk), length)

    dt = 'delta'
    if variant.has_bias:
        dt = g.op('Add', dt, g.op('Unsqueeze', 'delta_bias', g.ints(1)))
    if variant.softplus:
        dt = _softplus(g, dt)
    x = g.op('Mul', dt, 'u')

    # u-like (batch, dim, L) -> zero-padded (T, batch, G, 1, H, nc) and B-like (batch, G, N, L) ->
    # (T, batch, G, N, 1, nc): the step index leads (the sweeps' scan axis), the chunks are innermost, and the
    # transpose is a 2-D one, (batch G X nc, T) -> (T, batch G X nc). Padded steps get dt = 0 and x = 0: decay 1.
    def steps(t: str, rank: int, inner: str) -> str:
        pads = g.op('Concat', g.ints(*([0] * (2 * rank - 1))), pad, axis=0)
        flat = g.op('Reshape', g.op('Pad', t, pads), g.op('Concat', g.ints(-1), chunk, axis=0))
        middle = [g.ints(1), inner] if rank == 3 else [inner, g.ints(1)]
        return g.op('Reshape', g.op('Transpose', flat, perm=[1, 0]),
                    g.op('Concat', chunk, batch, groups, *middle, chunks, axis=0))

    dts, xs = steps(dt, 3, per_group), steps(x, 3, per_group)
    bs, cs = steps('B', 4, n), steps('C', 4, n)
    a_gnh = g.op('Transpose', g.op('Reshape', 'A', g.op('Concat', groups, per_group, n, axis=0)), perm=[0, 2, 1])
    g.nodes.append(helper.make_node('Unsqueeze', [a_gnh, g.ints(3)], ['A_gnh1']))  # the loop bodies read it

    state = g.op('Concat', batch, groups, n, per_group, chunks, axis=0)  # (batch, G, N, H, nc)
    zeros = g.op('ConstantOfShape', state, value=helper.make_tensor('z', TensorProto.FLOAT, [1], [0.0]))
    ends = g.op('Scan', zeros, dts, xs, bs, body=_recurrence_body('chunk_sweep', False), num_scan_inputs=3)
    # Chain the chunks (scanning the last axis): decays P = exp(A * sum of dt over the chunk), local ends.
    decays = g.op('Exp', g.op('Mul', g.op('ReduceSum', dts, g.ints(0), keepdims=0), 'A_gnh1'))
    carry0 = g.op('ConstantOfShape', g.op('Concat', batch, groups, n, per_group, axis=0),
                  value=helper.make_tensor('z', TensorProto.FLOAT, [1], [0.0]))
    _, starts = g.op('Scan', carry0, decays, ends, body=_carry_body(), num_scan_inputs=2, scan_input_axes=[4, 4],
                     scan_output_axes=[4], outputs=2)
    _, ys = g.op('Scan', starts, dts, xs, bs, cs, body=_recurrence_body('output_sweep', True), num_scan_inputs=4,
                 outputs=2)
    # (T, batch, G, 1, H, nc) -> (batch G H nc, T) -> (batch, dim, nc * T) -> the first L steps
    y = g.op('Transpose', g.op('Reshape', ys, g.op('Concat', chunk, g.ints(-1), axis=0)), perm=[1, 0])
    y = g.op('Reshape', y, g.op('Concat', batch, dim, g.ints(-1), axis=0))
    y = g.op('Slice', y, g.ints(0), length, g.ints(2))
    if variant.has_d:
        y = g.op('Add', y, g.op('Mul', 'u', g.op('Unsqueeze', 'D', g.ints(1))))
    if variant.has_z:
        y = g.op('Mul', y, g.op('Mul', 'z', g.op('Sigmoid', 'z')))
    g.nodes.append(helper.make_node('Identity', [y], ['y']))
    return helper.make_function(DOMAIN, variant.op_type, variant.input_names, ['y'], g.nodes,
                                [helper.make_opsetid('', opset)])
