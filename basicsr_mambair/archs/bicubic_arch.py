"""``Bicubic``: MATLAB-style bicubic upsampling as a parameter-free arch (the published SR baseline)."""

from __future__ import annotations

import math

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from ..utils.matlab_resize import matlab_weights_indices


def matlab_resize_matrix(in_length: int, scale: float) -> torch.Tensor:
    """Dense (out_length, in_length) float64 matrix of MATLAB's bicubic ``imresize`` along one axis.

    The same weights and mirrored borders as ``mambair-make-lr``; as a matrix, a batch is resized by
    two matmuls instead of BasicSR's per-row Python loop.
    """
    out_length = math.ceil(in_length * scale)
    weights, indices = matlab_weights_indices(in_length, out_length, scale)
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, torch.from_numpy(indices), torch.from_numpy(weights))
    return matrix


@ARCH_REGISTRY.register()
class Bicubic(nn.Module):
    """Upsample by ``upscale`` with MATLAB's bicubic kernel; no parameters.

    Input (B, C, H, W) in [0, 1]; output (B, C, H*upscale, W*upscale), not rounded or clamped
    (BasicSR's ``tensor2img`` does both before metrics, as for any network output).
    """

    def __init__(self, upscale: int = 2, **kwargs) -> None:
        super().__init__()
        self.upscale = upscale
        self._matrices: dict[tuple[int, str], torch.Tensor] = {}

    def _matrix(self, length: int, device: torch.device) -> torch.Tensor:
        key = (length, str(device))
        if key not in self._matrices:
            self._matrices[key] = matlab_resize_matrix(length, self.upscale).to(device)
        return self._matrices[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        rows, cols = self._matrix(h, x.device), self._matrix(w, x.device)
        out = torch.matmul(torch.matmul(rows, x.double()), cols.t())
        return out.to(x.dtype)
