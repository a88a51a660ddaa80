"""Converting images between the caller's form and the network's: numpy / PIL, gray / colour / alpha, bit depth.

numpy arrays are RGB(A) in channel order (``bgr=True`` for OpenCV arrays), ``uint8``, ``uint16`` or float in
[0, 1]; PIL images of mode L, LA, RGB, RGBA or I;16 (others are converted to RGB(A) first). The network sees
(H, W, in_channels) float32 in [0, 1]; results come back in the input's type, dtype and channel layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ImageError

_PIL_DIRECT = ('L', 'LA', 'RGB', 'RGBA', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')


def is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(image, Image.Image)


def pil_to_array(image: Any) -> np.ndarray:
    """A PIL image as an RGB(A)/gray numpy array of its bit depth."""
    if image.mode not in _PIL_DIRECT:
        has_alpha = image.mode in ('PA', 'RGBa', 'La') or 'transparency' in image.info
        image = image.convert('RGBA' if has_alpha else 'RGB')
    array = np.asarray(image)
    if image.mode.startswith('I;16'):
        array = array.astype(np.uint16)  # native byte order (I;16B arrays are big-endian)
    return array


def array_to_pil(array: np.ndarray) -> Any:
    from PIL import Image

    if array.dtype == np.float32 and array.ndim == 3:  # PIL has no float colour mode: 8 bits
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(array)


@dataclass
class Prepared:
    """An image split for the network: colour in [0, 1] as the network wants it, alpha, and how to put it back."""

    colour: np.ndarray  # (H, W, in_channels) float32, RGB order
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1]
    dtype: np.dtype  # uint8 / uint16 / float32 of the result
    to_gray: bool  # the result is converted to one channel (gray input, colour network)
    squeeze: bool  # 2-D input: 2-D result when it has one channel
    bgr: bool


def _normalise(image: np.ndarray, clip: bool) -> tuple[np.ndarray, np.dtype]:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0, np.dtype(np.uint8)  # as BasicSR's img2tensor
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0, np.dtype(np.uint16)
    if np.issubdtype(image.dtype, np.floating):
        pixels = image.astype(np.float32)
        finite = np.isfinite(pixels)
        if not finite.all():  # a NaN spreads over the whole result (or turns it black): never an image
            raise ImageError(f'the image has {pixels.size - int(finite.sum())} NaN/Inf values '
                             f'({pixels.shape[1]}x{pixels.shape[0]} float pixels)')
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0.0 or high > 1.0:
            if not clip:
                raise ImageError(f'float pixel values must lie in [0, 1], these span [{low:.4g}, {high:.4g}] '
                                 '(scale the image, or pass clip=True / --clip to clip it)')
            pixels = np.clip(pixels, 0.0, 1.0)
        return pixels, np.dtype(np.float32)
    raise ImageError(f'unsupported pixel type {image.dtype} (use uint8, uint16 or float in [0, 1])')


def prepare(image: np.ndarray, in_channels: int, bgr: bool, clip: bool = False) -> Prepared:
    """Split ``image`` for the network (see :class:`Prepared`); float values outside [0, 1] are an
    :class:`ImageError` unless ``clip``, NaN/Inf always."""
    import cv2

    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise ImageError(f'unsupported image shape {image.shape} (use (H, W) or (H, W, C) with C = 1, 2, 3 or 4)')
    if min(image.shape[:2]) < 1:
        raise ImageError(f'empty image {image.shape}')
    if in_channels not in (1, 3):
        raise ImageError(f'the network takes {in_channels}-channel inputs; only 1 (gray) and 3 (RGB) are '
                         'supported for images')
    squeeze = image.ndim == 2
    pixels, dtype = _normalise(image if image.ndim == 3 else image[..., None], clip)
    channels = pixels.shape[2]
    alpha = pixels[..., -1].copy() if channels in (2, 4) else None
    colour = pixels[..., :3] if channels >= 3 else pixels[..., :1]
    if colour.shape[2] == 3 and bgr:
        colour = colour[..., ::-1]
    gray_input = colour.shape[2] == 1
    if in_channels == 1 and not gray_input:
        colour = cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_RGB2GRAY)[..., None]
    elif in_channels == 3 and gray_input:
        colour = np.repeat(colour, 3, axis=2)
    return Prepared(colour=np.ascontiguousarray(colour), alpha=alpha, dtype=dtype,
                     to_gray=gray_input and in_channels == 3, squeeze=squeeze, bgr=bgr)


def finish(colour: np.ndarray, prep: Prepared, scale: int) -> np.ndarray:
    """Network-domain (h, w, C) float32 RGB -> the caller's layout, alpha (resized by ``scale``) and dtype."""
    import cv2

    colour = np.clip(colour, 0.0, 1.0)
    if prep.to_gray and colour.shape[2] == 3:
        colour = cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_RGB2GRAY)[..., None]
    if colour.shape[2] == 3 and prep.bgr:
        colour = colour[..., ::-1]
    parts = [colour]
    if prep.alpha is not None:
        alpha = prep.alpha
        if scale != 1:
            size = (colour.shape[1], colour.shape[0])
            alpha = np.clip(cv2.resize(alpha, size, interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
        parts.append(alpha[..., None])
    result = np.concatenate(parts, axis=2) if len(parts) > 1 else colour
    if prep.squeeze and result.shape[2] == 1:
        result = result[..., 0]
    if prep.dtype == np.uint8:
        return np.round(result * 255.0).astype(np.uint8)  # as BasicSR's tensor2img
    if prep.dtype == np.uint16:
        return np.round(result * 65535.0).astype(np.uint16)
    return np.ascontiguousarray(result, dtype=np.float32)


def check_finite_result(out: Any, path: str | None = None) -> None:
    """Refuse a network result (tensor or array) holding NaN/Inf: it would become a black or NaN image (and a
    meaningless PSNR). Raises :class:`ImageError` naming ``path`` (the input) when given."""
    import torch

    values = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = values.numel() - int(finite.sum())
        raise ImageError(f'the network produced {bad} NaN/Inf values of {values.numel()}: its weights are broken '
                         '(a diverged training?) or overflow on this image; no result is kept', path)
