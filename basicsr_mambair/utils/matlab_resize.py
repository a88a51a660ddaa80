"""MATLAB's ``imresize`` bicubic kernel along one axis (shared by the LR tool and the ``Bicubic`` arch)."""

from __future__ import annotations

import numpy as np


def matlab_weights_indices(in_length: int, out_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's antialiased bicubic contributions along one axis.

    Returns:
        weights (out_length, taps) float64 and indices (out_length, taps) of input pixels
        (0-based, mirrored at the borders as MATLAB does).
    """
    import torch
    from basicsr.utils.matlab_functions import calculate_weights_indices

    # BasicSR's helper follows MATLAB's formulas but computes in torch's default dtype; MATLAB uses
    # double, and float32 weights flip some roundings, so evaluate it in float64.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        weights, indices, sym_len_s, _ = calculate_weights_indices(in_length, out_length, scale, 'cubic', 4, True)
    finally:
        torch.set_default_dtype(previous)
    # BasicSR's indices point into an input padded by `sym_len_s` mirrored pixels; MATLAB instead
    # maps every 1-based index i to aux[(i - 1) mod 2n] with aux = [1..n, n..1].
    original = indices.numpy().astype(np.int64) - sym_len_s
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    return weights.numpy(), mirror[np.mod(original, 2 * in_length)]
