"""``Bicubic``: MATLAB-style bicubic upsampling as a parameter-free arch (the published SR baseline)."""

from __future__ import annotations

import math

import torch
from basicsr.utils.matlab_functions import calculate_weights_indices
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn


def matlab_resize_matrix(in_length: int, scale: float, antialiasing: bool = True) -> torch.Tensor:
    """Dense (out_length, in_length) matrix of MATLAB's ``imresize`` bicubic along one axis.

    The weights and the symmetric border handling are BasicSR's ``imresize`` (cubic a = -0.5,
    kernel width 4); written as a matrix so that a batch is resized by two matmuls instead of
    BasicSR's per-row Python loop.
    """
    out_length = math.ceil(in_length * scale)
    weights, indices, sym_start, _ = calculate_weights_indices(in_length, out_length, scale, 'cubic', 4,
                                                               antialiasing)
    # indices address the symmetrically padded signal; map them back onto the input
    padded = indices.long() - sym_start
    src = torch.where(padded < 0, -padded - 1, padded)
    src = torch.where(src >= in_length, 2 * in_length - 1 - src, src)
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, src, weights.double())
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
