"""ONNX export (basicsr_mambair.deploy, mambair-export): every family exported and run with onnxruntime on
real images equals PyTorch within 1e-4, with standard ONNX operators only."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from helpers import arch_class, run_cli

FP32_TOL = 1e-4


def _require(module: str):
    """The module, else a skip -- but a failure in CI, where the onnx extra must be installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed (pip install -e '.[onnx]')"
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope='module', autouse=True)
def onnx_packages():
    return _require('onnx'), _require('onnxruntime')


def _nodes(graph):
    """Every node, loop bodies included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField('g'):
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def assert_standard_onnx(model) -> None:
    """Only operators of the default ONNX domain (no custom domain, no model-local function), Scan loops present."""
    import onnx

    nodes = list(_nodes(model.graph))
    odd = {(n.domain, n.op_type) for n in nodes if n.domain not in ('', 'ai.onnx') or not onnx.defs.has(n.op_type)}
    assert not odd, f'non-standard ops: {odd}'
    assert not model.functions
    assert {o.domain for o in model.opset_import} <= {'', 'ai.onnx'}
    assert sum(n.op_type == 'Scan' for n in model.graph.node) >= 3  # the scan is loops, not an unrolled chain


def _image(shared_data, relative: str, channels: int, top: int, left: int, h: int, w: int) -> np.ndarray:
    """(1, C, h, w) float32 network input from a real image, converted as mambair-restore converts it."""
    from basicsr_mambair.deploy.onnx_runtime import _network_input

    x = _network_input(shared_data / relative, channels)
    assert x.shape[2] >= top + h and x.shape[3] >= left + w
    return np.ascontiguousarray(x[:, :, top:top + h, left:left + w])


def _torch(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def _tiny_light_sr() -> dict:
    """A small light-SR config (pixelshuffledirect head, light CAB); no reference file has one."""
    return {'upscale': 2, 'in_chans': 3, 'd_state': 10, 'depths': [2, 1], 'embed_dim': 30, 'mlp_ratio': 1.2,
            'upsampler': 'pixelshuffledirect', 'resi_connection': '1conv'}


# family: (reference file or None for the tiny light config, image, channels)
FAMILIES = {
    'lightSR': (None, 'Set5/LR_bicubic/X2/butterflyx2.png', 3),
    'classicSR_x2': ('tiny_mambair_classicSR_x2.pt', 'Set5/LR_bicubic/X2/babyx2.png', 3),
    'classicSR_x3_3conv': ('tiny_mambair_classicSR_x3.pt', 'Set14/LR_bicubic/X3/comicx3.png', 3),
    'colorDN': ('tiny_mambair_colorDN.pt', 'CBSD68/101085.png', 3),
    'CAR': ('tiny_mambair_CAR.pt', 'Classic5/lena.bmp', 1),
    'realDN_unet': ('tiny_mambairunet.pt', 'SIDD_samples/NOISY/NOISY_0.png', 3),
}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_family_exports_and_matches_pytorch(family, tmp_path, shared_data, reference_dir):
    """Dynamic-size export; onnxruntime on two real crops (sizes unlike the traced one and, for the UNet, not
    multiples of 8) equals PyTorch within 1e-4; on the official reference input it equals the official output."""
    import onnx

    from basicsr_mambair.deploy import OnnxModel, export_onnx

    ref_name, image, channels = FAMILIES[family]
    ref = torch.load(reference_dir / ref_name, weights_only=True) if ref_name else None
    torch.manual_seed(0)
    net = arch_class(ref['arch_type'] if ref else 'MambaIR')(**(ref['kwargs'] if ref else _tiny_light_sr())).eval()
    if ref:
        net.load_state_dict(ref['state_dict'], strict=True)
    path = tmp_path / f'{family}.onnx'
    result = export_onnx(net, path)
    assert result.size is None and path.is_file() and result.file_bytes == path.stat().st_size
    model = onnx.load(path)
    assert_standard_onnx(model)
    runner = OnnxModel(path)
    assert runner.static_size is None and runner.metadata['arch'] == type(net).__name__
    for top, left, h, w in ((10, 20, 21, 27), (40, 3, 33, 17)):
        x = _image(shared_data, image, channels, top, left, h, w)
        got, expected = runner(x), _torch(net, x)
        assert got.shape == expected.shape == (1, channels, h * result.scale, w * result.scale)
        assert np.abs(got - expected).max() < FP32_TOL, family
        assert x.std() > 0.02  # a real picture, not a flat patch
    if ref:  # the graph reproduces the official implementation (batch 2 through the dynamic batch axis)
        got = runner(ref['input'].numpy())
        assert np.abs(got - ref['output'].numpy()).max() < FP32_TOL


def test_official_light_sr_x2(tmp_path, shared_data, reference_dir):
    """The released light SR x2 configuration (905,016 parameters): a static 32x40 graph on a real crop."""
    from basicsr_mambair.deploy import OnnxModel, export_onnx

    ref = torch.load(reference_dir / 'mambair_lightSR_x2.pt', weights_only=True)
    net = arch_class(ref['arch_type'])(**ref['kwargs']).eval()
    net.load_state_dict(ref['state_dict'], strict=True)
    assert sum(p.numel() for p in net.parameters()) == 905_016
    result = export_onnx(net, tmp_path / 'light_x2.onnx', size=(32, 40))
    runner = OnnxModel(result.path)
    assert runner.static_size == (32, 40)
    x = _image(shared_data, 'Set14/LR_bicubic/X2/zebrax2.png', 3, 50, 60, 32, 40)
    got, expected = runner(x), _torch(net, x)
    assert got.shape == (1, 3, 64, 80)
    assert np.abs(got - expected).max() < FP32_TOL


def test_unsupported_sizes_get_one_clear_line(tmp_path, reference_dir):
    """A static graph refuses other sizes, channel counts and ranks; the UNet graph refuses sides below 5."""
    from basicsr_mambair.deploy import OnnxModel, export_onnx
    from basicsr_mambair.errors import ExportError

    ref = torch.load(reference_dir / 'tiny_mambairunet.pt', weights_only=True)
    net = arch_class(ref['arch_type'])(**ref['kwargs']).eval()
    net.load_state_dict(ref['state_dict'])
    static = OnnxModel(export_onnx(net, tmp_path / 'static.onnx', size=(24, 16)).path)
    x = np.random.default_rng(0).random((2, 3, 24, 16), dtype=np.float32)
    assert np.abs(static(x) - _torch(net, x)).max() < FP32_TOL  # batch 2: the batch axis stays dynamic
    cases = [(static, (1, 3, 16, 24), 'exported for 24x16 inputs, got 16x24'),
             (static, (1, 1, 24, 16), '3-channel inputs, got 1'),
             (static, (3, 24, 16), 'got shape (3, 24, 16)')]
    dynamic = OnnxModel(export_onnx(net, tmp_path / 'dynamic.onnx').path)
    assert dynamic(x[:1, :, :5, :7]).shape == (1, 3, 5, 7)  # reflection-padded to 8x8 inside the graph
    cases.append((dynamic, (1, 3, 4, 30), 'at least 5x5 pixels, got 4x30'))
    for runner, shape, expected in cases:
        with pytest.raises(ExportError) as info:
            runner(np.zeros(shape, np.float32))
        assert expected in str(info.value) and '\n' not in str(info.value)
    with pytest.raises(ExportError, match='below the 5-pixel minimum'):
        export_onnx(net, tmp_path / 'tiny.onnx', size=(4, 8))
    assert not (tmp_path / 'tiny.onnx').exists()


def test_fp16_graph(tmp_path, shared_data, reference_dir):
    """--fp16: half the file, float32 input/output, the scan's loops in float32; within 1e-2 of float32 PyTorch."""
    import onnx

    from basicsr_mambair.deploy import OnnxModel, export_onnx

    ref = torch.load(reference_dir / 'tiny_mambair_colorDN.pt', weights_only=True)
    net = arch_class(ref['arch_type'])(**ref['kwargs']).eval()
    net.load_state_dict(ref['state_dict'])
    full = export_onnx(net, tmp_path / 'fp32.onnx')
    half = export_onnx(net, tmp_path / 'fp16.onnx', fp16=True)
    assert half.file_bytes < 0.7 * full.file_bytes
    model = onnx.load(half.path)
    assert_standard_onnx(model)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    sizes = {f32: 0, f16: 0}
    for init in model.graph.initializer:
        sizes[init.data_type] += int(np.prod(init.dims))
    scan_params = sum(m.A_logs.numel() + m.Ds.numel() + m.dt_projs_bias.numel() for m in net.modules()
                      if type(m).__name__ == 'SS2D')
    assert sizes[f32] == scan_params  # the scan's own parameters stay float32, everything else is half
    assert sizes[f16] + sizes[f32] >= sum(p.numel() for p in net.parameters())
    assert model.graph.input[0].type.tensor_type.elem_type == f32
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    bodies = [a.g for n in model.graph.node if n.op_type == 'Scan' for a in n.attribute if a.name == 'body']
    assert bodies and all(v.type.tensor_type.elem_type == f32 for b in bodies for v in b.input)
    x = _image(shared_data, 'CBSD68/101087.png', 3, 0, 0, 24, 32)
    diff = np.abs(OnnxModel(half.path)(x) - _torch(net, x)).max()
    assert 0 < diff < 1e-2


def test_scan_function_variants_equal_the_reference(tmp_path):
    """The ONNX scan alone, every optional part on and off, lengths around the chunking (1, 7, 50 steps), one to
    four groups of B/C: equal to the float64 reference loop to float32 rounding."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from basicsr_mambair.deploy.onnx_export import inline_scans
    from basicsr_mambair.ops.scan import selective_scan_reference
    from basicsr_mambair.ops.scan.onnx_node import DOMAIN, ScanVariant

    gen = torch.Generator().manual_seed(3)
    for variant, groups, length in [(ScanVariant(), 4, 50), (ScanVariant(False, False, True, False), 1, 7),
                                    (ScanVariant(True, True, True, True), 2, 1)]:
        batch, dim, n = 2, 6 * groups, 5
        data = {'u': torch.randn(batch, dim, length, generator=gen),
                # without softplus dt must stay >= 0 (decaying states), as softplus makes it
                'delta': (torch.randn if variant.softplus else torch.rand)(batch, dim, length, generator=gen) * 2,
                'A': -torch.rand(dim, n, generator=gen) * 8,
                'B': torch.randn(batch, groups, n, length, generator=gen),
                'C': torch.randn(batch, groups, n, length, generator=gen),
                'D': torch.randn(dim, generator=gen), 'delta_bias': torch.randn(dim, generator=gen),
                'z': torch.randn(batch, dim, length, generator=gen)}
        feeds = {k: data[k].numpy() for k in variant.input_names}
        node = helper.make_node(variant.op_type, variant.input_names, ['y'], domain=DOMAIN)
        graph = helper.make_graph(
            [node], 'scan', [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in feeds.items()],
            [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch', 'dim', 'L'])])
        model = inline_scans(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]))
        onnx.checker.check_model(model)
        assert_standard_onnx(model)
        got = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider']).run(None, feeds)[0]
        d = {k: data[k].double() if k in variant.input_names else None for k in data}
        expected = selective_scan_reference(d['u'], d['delta'], d['A'], d['B'], d['C'], d['D'], z=d['z'],
                                            delta_bias=d['delta_bias'], delta_softplus=variant.softplus)
        scale = expected.abs().max().item()
        assert np.abs(got - expected.numpy()).max() < 2e-6 * scale, (variant, groups, length)


def test_own_torch_onnx_export_is_finished_by_inline_scans(reference_dir):
    """A plain torch.onnx.export holds one placeholder node per scan (eager runs never see one);
    inline_scans makes it standard and correct."""
    import io

    import onnx
    import onnxruntime as ort

    from basicsr_mambair.deploy import inline_scans, nonstandard_ops

    ref = torch.load(reference_dir / 'tiny_mambair_CAR.pt', weights_only=True)
    net = arch_class(ref['arch_type'])(**ref['kwargs']).eval()
    net.load_state_dict(ref['state_dict'])
    x = ref['input'][:1]
    buffer = io.BytesIO()
    with pytest.warns(DeprecationWarning), torch.no_grad():  # torch's note on its TorchScript exporter
        torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=17)
    raw = onnx.load_from_string(buffer.getvalue())
    assert nonstandard_ops(raw) == ['mambair::SelectiveScanDBiasSoftplus']
    assert sum(n.domain == 'mambair' for n in raw.graph.node) == sum(ref['kwargs']['depths'])
    model = inline_scans(raw)
    assert_standard_onnx(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider']).run(None, {
        model.graph.input[0].name: x.numpy()})[0]
    assert np.abs(got - ref['output'][:1].numpy()).max() < FP32_TOL


def test_cli_export_with_check(tmp_path, shared_data, reference_dir):
    """mambair-export in a subprocess on a saved checkpoint: the architecture is inferred, --check passes."""
    import onnx

    ref = torch.load(reference_dir / 'tiny_mambair_classicSR_x2.pt', weights_only=True)
    torch.save({'params': ref['state_dict']}, tmp_path / 'net_g.pth')
    image = shared_data / 'Set5' / 'LR_bicubic' / 'X2' / 'headx2.png'
    proc = run_cli('mambair-export', 'net_g.pth', '-o', 'sr.onnx', '--size', '48x40', '--check', str(image),
                   cwd=tmp_path)
    assert 'check ok' in proc.stdout and 'x2' in proc.stdout, proc.stdout
    diff = float(proc.stdout.split('pytorch| = ')[1].split()[0])
    assert 0 <= diff < FP32_TOL
    model = onnx.load(tmp_path / 'sr.onnx')
    assert_standard_onnx(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta['mambair.arch'] == 'MambaIR' and meta['mambair.scale'] == '2' and meta['mambair.input_size'] == '48x40'


def test_cli_errors_are_one_line(tmp_path, capsys, shared_data, reference_dir):
    """Exit 2 with one line for bad arguments, a missing or foreign checkpoint and an existing output; exit 1
    when the check fails, leaving the existing file untouched."""
    from basicsr_mambair.cli.export import main

    ref = torch.load(reference_dir / 'tiny_mambair_CAR.pt', weights_only=True)
    torch.save({'params': ref['state_dict']}, tmp_path / 'car.pth')
    torch.save({'params': {'conv.weight': torch.zeros(3, 3)}}, tmp_path / 'foreign.pth')
    image = str(shared_data / 'Classic5' / 'boats.bmp')
    ckpt, out = str(tmp_path / 'car.pth'), str(tmp_path / 'car.onnx')
    cases = [
        (['--size', '0x5', ckpt, '-o', out], 2, '--size must be HxW'),
        ([ckpt, '--size', '16x16', '--dynamic'], 2, 'not allowed with argument'),
        ([str(tmp_path / 'missing.pth'), '-o', out], 2, 'no such checkpoint file'),
        ([str(tmp_path / 'foreign.pth'), '-o', out], 2, 'not a MambaIR-family state dict'),
        ([ckpt, '-o', out, '--opset', '12'], 2, 'opset 12 is not supported'),
        ([ckpt, '-o', out, '--size', '16x16'], 0, None),
        ([ckpt, '-o', out], 2, 'exists (use --overwrite'),
        ([ckpt, '-o', out, '--size', '16x16', '--check', str(tmp_path / 'none.png'), '--overwrite'], 2, 'none.png'),
        ([ckpt, '-o', out, '--size', '16x16', '--check', image, '--tolerance', '1e-12', '--overwrite'], 1,
         'check FAILED'),
    ]
    written = None
    for argv, status, message in cases:
        assert main(argv) == status, argv
        err = capsys.readouterr().err
        if message is None:
            written = (tmp_path / 'car.onnx').read_bytes()
            continue
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('mambair-export: error: ') and message in lines[0], err
    assert (tmp_path / 'car.onnx').read_bytes() == written  # the failed check replaced nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ['car.onnx', 'car.pth', 'foreign.pth']  # no temp files


def test_dynamo_exporter(tmp_path, shared_data, reference_dir):
    """torch's torch.export-based exporter (the fallback once the TorchScript one is gone) gives the same graph
    semantics: standard ops, dynamic batch and size, onnxruntime == PyTorch."""
    _require('onnxscript')
    import onnx

    from basicsr_mambair.deploy import OnnxModel, export_onnx

    ref = torch.load(reference_dir / 'tiny_mambair_CAR.pt', weights_only=True)
    net = arch_class(ref['arch_type'])(**ref['kwargs']).eval()
    net.load_state_dict(ref['state_dict'])
    result = export_onnx(net, tmp_path / 'dynamo.onnx', exporter='dynamo')
    assert result.exporter == 'dynamo' and result.opset == 18
    assert_standard_onnx(onnx.load(result.path))
    runner = OnnxModel(result.path)
    x = _image(shared_data, 'Classic5/peppers.bmp', 1, 100, 200, 19, 26)
    assert np.abs(runner(x) - _torch(net, x)).max() < FP32_TOL
    assert np.abs(runner(ref['input'].numpy()) - ref['output'].numpy()).max() < FP32_TOL
