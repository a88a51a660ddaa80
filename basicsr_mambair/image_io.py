"""Image files: which names are images, listing a folder, reading with one clear error, writing atomically.

Shared by the datasets, the data tools and ``mambair-restore`` (one extension list, one reader). OpenCV
does the decoding and encoding; this module adds what it lacks: non-ASCII paths, EXIF orientation of
JPEGs with alpha/16-bit kept for the rest, silence instead of OpenCV's log lines, and errors naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageError
from .utils.files import atomic_write_bytes

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pnm', '.jp2')
UNREADABLE = 'cannot decode image: not an image file, truncated, or a format OpenCV cannot read'


class InputNotFound(ImageError, FileNotFoundError):
    """A folder or file to read images from does not exist or holds no images."""


def is_image_file(name: str) -> bool:
    """Whether ``name`` has an image extension we read (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | Path, what: str = 'image folder') -> list[Path]:
    """Sorted image files directly inside ``folder`` (other files, e.g. a README, are ignored).

    Raises :class:`InputNotFound` (``'<what> not found: <folder>'``) or when it holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFound(f'{what} not found: {folder}')
    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))
    if not paths:
        raise InputNotFound(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {folder}')
    return paths


def read_image(path: str | Path, flag: int | None = None) -> np.ndarray:
    """An image file as OpenCV decodes it (BGR(A) or gray, 8/16-bit or float kept).

    ``flag`` (an OpenCV ``IMREAD_*``) chooses the decoding; the default keeps alpha and bit depth and turns
    JPEGs by their EXIF orientation. Raises :class:`ImageError` with the file as its ``path``.
    """
    import cv2

    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # not cv2.imread: it fails silently on non-ASCII paths
    except OSError as exc:
        raise ImageError(f'cannot read the file: {exc.strerror or exc}', str(path)) from None
    if flag is None:
        is_jpeg = data[:3].tobytes() == b'\xff\xd8\xff'
        # IMREAD_UNCHANGED keeps alpha and 16 bits but ignores EXIF orientation; JPEGs have neither
        flag = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH if is_jpeg else cv2.IMREAD_UNCHANGED
    log = getattr(cv2.utils, 'logging', None)
    previous = log.getLogLevel() if log else None
    if log:  # OpenCV prints its own warnings for broken files; ours is the one error below
        log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        image = cv2.imdecode(data, flag) if data.size else None
    finally:
        if log:
            log.setLogLevel(previous)
    if image is None:
        raise ImageError(UNREADABLE, str(path))
    return image


def encode_image(image: np.ndarray, ext: str = '.png', params: list[int] | None = None) -> bytes:
    """``image`` (BGR(A)/gray, uint8/uint16) encoded by OpenCV in the format of ``ext``."""
    import cv2

    ok, data = cv2.imencode(ext, image, params or [])
    if not ok:
        raise ImageError(f'OpenCV could not encode an image of shape {image.shape} ({image.dtype}) as {ext}')
    return data.tobytes()


def write_image(path: str | Path, image: np.ndarray, params: list[int] | None = None) -> None:
    """Encode ``image`` in the format of ``path``'s extension and write it atomically (never a partial file)."""
    path = Path(path)
    atomic_write_bytes(path, encode_image(image, path.suffix or '.png', params))
