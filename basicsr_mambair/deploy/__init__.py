"""Deploying networks outside PyTorch: ONNX export (:func:`export_onnx`) and ONNX Runtime (:class:`OnnxModel`).

Needs the ``onnx`` extra (``pip install 'basicsr-mambair[onnx]'``: onnx, onnxruntime, onnxscript); importing
this package does not import them.
"""

from .onnx_export import DEFAULT_OPSET, ExportResult, export_onnx, inline_scans, min_side, nonstandard_ops
from .onnx_runtime import CheckResult, OnnxModel, check_against_torch

__all__ = ['DEFAULT_OPSET', 'CheckResult', 'ExportResult', 'OnnxModel', 'check_against_torch', 'export_onnx',
           'inline_scans', 'min_side', 'nonstandard_ops']
