"""MATLAB's ``imresize`` bicubic: the kernel along one axis (shared with the ``Bicubic`` arch) and the uint8 LR
images of the benchmark files (``mambair-make-lr``, the demo)."""

from __future__ import annotations

import math

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


def resize_axis(img: np.ndarray, axis: int, scale: float, to_uint8: bool) -> np.ndarray:
    """Resize ``img`` along ``axis`` (0 = rows, 1 = columns) by ``scale`` (< 1 shrinks).

    Sums run over the kernel taps in order, in float64, like MATLAB's ``imresizemex``; with
    ``to_uint8`` the result is rounded half away from zero and saturated to 0..255.
    """
    in_length = img.shape[axis]
    out_length = math.ceil(in_length * scale)
    weights, indices = matlab_weights_indices(in_length, out_length, scale)
    src = np.moveaxis(np.asarray(img, dtype=np.float64), axis, 0)
    extra = (1,) * (src.ndim - 1)
    out = weights[:, 0].reshape(-1, *extra) * src[indices[:, 0]]
    for k in range(1, weights.shape[1]):
        out += weights[:, k].reshape(-1, *extra) * src[indices[:, k]]
    out = np.moveaxis(out, 0, axis)
    if to_uint8:
        out = np.floor(np.clip(out, 0, 255) + 0.5).astype(np.uint8)
    return out


def imresize_matlab(img: np.ndarray, scale: int, per_pass_uint8: bool = True) -> np.ndarray:
    """The bicubic LR of a uint8 image (HxW or HxWxC) at factor ``scale``, as MATLAB makes it.

    The image is mod-cropped to a multiple of ``scale`` first (top-left kept, as ``modcrop.m``).
    ``per_pass_uint8``: MATLAB on uint8 input (the benchmark files); False: on double input,
    rounded to uint8 once at the end.
    """
    from basicsr.data.transforms import mod_crop

    if img.dtype != np.uint8:
        raise ValueError(f'imresize_matlab needs a uint8 image, got {img.dtype}')
    hr = mod_crop(img, scale)
    if min(hr.shape[:2]) < scale:
        raise ValueError(f'image {img.shape[1]}x{img.shape[0]} is smaller than the scale {scale}')
    rows = resize_axis(hr, 0, 1 / scale, per_pass_uint8)
    return resize_axis(rows, 1, 1 / scale, True)
