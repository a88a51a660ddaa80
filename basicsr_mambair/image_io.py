"""Image files: which names are images, listing a folder, reading with one clear error, writing atomically.

Shared by the datasets, the data tools and ``mambair-restore`` (one extension list, one reader). OpenCV
does the decoding and encoding; this module adds what it lacks: non-ASCII paths, EXIF orientation of
JPEGs with alpha/16-bit kept for the rest, silence instead of OpenCV's log lines, and errors naming the file.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np

from .errors import ImageError
from .utils.files import Verify, atomic_write_bytes

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


DEFAULT_MAX_PIXELS = 1 << 28  # 268 M pixels (16384 x 16384); OpenCV's own limit is 1 << 30
_LOSSLESS = ('.png', '.bmp', '.tif', '.tiff', '.ppm', '.pgm', '.pnm')


def max_pixels() -> int:
    """The largest image (width x height) read: ``$MAMBAIR_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    value = os.environ.get('MAMBAIR_MAX_PIXELS', '')
    try:
        return int(float(value)) if value else DEFAULT_MAX_PIXELS
    except ValueError:
        raise ImageError(f'MAMBAIR_MAX_PIXELS must be a number of pixels, got {value!r}') from None


def header_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding it; None for formats Pillow does not know.

    Pillow's format plugins parse only the header when constructed; ``Image.open`` is not used because its
    decompression-bomb check raises before the size can be reported in our terms.
    """
    try:
        from PIL import Image
    except ImportError:
        return None
    head = data[:64].tobytes()
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is None or not accept(head):
            continue
        try:
            with factory(io.BytesIO(data.tobytes()), '') as im:
                return int(im.size[0]), int(im.size[1])
        except Exception:  # noqa: BLE001  (not this format, or a header Pillow cannot parse: OpenCV decides)
            continue
    return None


def check_header(data: np.ndarray, path: str | Path) -> None:
    """Refuse an image whose header claims more than :func:`max_pixels` pixels, before anything is decoded."""
    size = header_size(data)
    limit = max_pixels()
    if size is not None and size[0] * size[1] > limit:
        w, h = size
        raise ImageError(f'image too large: its header says {w}x{h} ({w * h / 1e6:.0f} M pixels), more than the '
                         f'limit of {limit / 1e6:.0f} M pixels (set MAMBAIR_MAX_PIXELS to raise it)', str(path))


def read_image(path: str | Path, flag: int | None = None) -> np.ndarray:
    """An image file as OpenCV decodes it (BGR(A) or gray, 8/16-bit or float kept).

    ``flag`` (an OpenCV ``IMREAD_*``) chooses the decoding; the default keeps alpha and bit depth and turns
    JPEGs by their EXIF orientation. The header's size is checked first (:func:`check_header`). Raises
    :class:`ImageError` with the file as its ``path``.
    """
    import cv2

    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # not cv2.imread: it fails silently on non-ASCII paths
    except OSError as exc:
        raise ImageError(f'cannot read the file: {exc.strerror or exc}', str(path)) from None
    if data.size:
        check_header(data, path)
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
    except cv2.error as exc:  # e.g. a header OpenCV refuses (its own size limit), or a decoder failure
        detail = ' '.join(str(exc).split(') ')[-1].split()) or 'decoder error'
        raise ImageError(f'{UNREADABLE} (OpenCV: {detail})', str(path)) from None
    finally:
        if log:
            log.setLogLevel(previous)
    if image is None:
        raise ImageError(UNREADABLE, str(path))
    return image


def encodable(image: np.ndarray) -> np.ndarray:
    """``image`` in a layout OpenCV encodes: gray + alpha (2 channels, e.g. a 1-channel network's result of an
    RGBA or LA image) becomes BGRA with the gray value in B, G and R (OpenCV writes 1, 3 or 4 channels only)."""
    if image.ndim == 3 and image.shape[2] == 2:
        gray, alpha = image[..., 0], image[..., 1]
        return np.ascontiguousarray(np.stack([gray, gray, gray, alpha], axis=2))
    return image


def encode_image(image: np.ndarray, ext: str = '.png', params: list[int] | None = None) -> bytes:
    """``image`` (BGR(A)/gray/gray+alpha, uint8/uint16) encoded by OpenCV in the format of ``ext``."""
    import cv2

    image = encodable(image)
    ok, data = cv2.imencode(ext, image, params or [])
    if not ok:
        raise ImageError(f'OpenCV could not encode an image of shape {image.shape} ({image.dtype}) as {ext}')
    return data.tobytes()


def decodes_to(image: np.ndarray, lossless: bool = True) -> Verify:
    """A ``verify`` for :func:`~basicsr_mambair.utils.files.atomic_write_bytes`: the file decodes back to
    ``image``'s shape and dtype, and (``lossless``) to its pixels."""
    import cv2

    want = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image  # (H, W, 1) decodes as (H, W)

    def verify(tmp: Path) -> None:
        back = cv2.imdecode(np.fromfile(str(tmp), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        same = back is not None and back.shape == want.shape and back.dtype == want.dtype
        if not same or (lossless and not np.array_equal(back, want)):
            raise OSError(errno.EIO, 'the written image does not decode back to what was written')

    return verify


def decodes_to_shape(shape: tuple[int, ...]) -> Verify:
    """A ``verify``: the file decodes to an image of ``shape`` (for lossy formats such as JPEG)."""
    return decodes_to(np.empty(shape, np.uint8), lossless=False)


def write_image(path: str | Path, image: np.ndarray, params: list[int] | None = None) -> None:
    """Encode ``image`` in the format of ``path``'s extension and write it atomically, checking that the file
    decodes back (never a partial or corrupt file under ``path``; ``OSError`` naming ``path`` otherwise)."""
    path = Path(path)
    image = encodable(image)
    ext = path.suffix.lower() or '.png'
    atomic_write_bytes(path, encode_image(image, ext, params), verify=decodes_to(image, ext in _LOSSLESS))
