"""Read images and binary masks from disk as uint8 arrays, with errors that name the file.

* :func:`read_rgb` decodes an RGB image. Given the size it will be resized to, it asks the
  JPEG decoder for a reduced-resolution decode (libjpeg's DCT scaling through Pillow's
  ``draft``), so a 4288×2848 fundus photograph bound for 1072×712 costs a quarter of a full
  decode. It also returns the file's full size, for checking masks against it.
* :func:`read_grey` decodes an image as grey levels (OCT B-scans, grey-level label maps), with
  the same reduced decode.
* :func:`read_mask` reads a binary mask in any mode the datasets use (palette ``P`` with
  indices 0/1, 1-bit, 8-bit 0/255, 16-bit, RGB, RGBA, ``LA``) and returns ``uint8`` 0/1:
  any non-zero value (palette index, grey level or colour channel) is foreground. Alpha
  channels are never read: IDRiD's ``IDRiD_81_EX.tif`` is RGBA with alpha 255 everywhere, and
  reading its alpha would mark the whole image as lesion.
* :func:`resize_image` and :func:`resize_mask` resize to ``(height, width)``; masks use
  nearest neighbour and stay ``uint8``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from moekit.errors import DataError

_READ_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


def _open(path: Path, what: str) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None


def read_rgb(
    path: str | Path, target_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file as ``uint8 [H, W, 3]`` RGB.

    Args:
        path: the image file (JPEG, PNG, TIFF...).
        target_size: ``(height, width)`` the caller will resize to; JPEGs are then decoded at
            the smallest power-of-two reduction that is still at least this large.

    Returns:
        The decoded array (possibly reduced) and the file's full ``(height, width)``.

    Raises:
        DataError: the file is missing, not an image, or truncated/corrupt.
    """
    path = Path(path)
    with _open(path, "image") as img:
        full_size = (img.height, img.width)
        try:
            if target_size is not None:
                img.draft("RGB", (target_size[1], target_size[0]))
            rgb = np.asarray(img.convert("RGB"))
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return rgb, full_size


def read_grey(
    path: str | Path, target_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file as ``uint8 [H, W]`` grey levels (colour and palette images are
    converted by luminance; 16-bit and float images are scaled so that their maximum is 255),
    e.g. an OCT B-scan, a mammogram or a label map of grey levels.

    ``target_size`` asks JPEGs for a reduced decode as in :func:`read_rgb`; the file's full
    ``(height, width)`` is returned with the array.

    Raises:
        DataError: the file is missing, not an image, or truncated/corrupt.
    """
    path = Path(path)
    with _open(path, "image") as img:
        full_size = (img.height, img.width)
        try:
            if target_size is not None:
                img.draft("L", (target_size[1], target_size[0]))
            if img.mode.startswith(("I", "F")):
                wide = np.asarray(img, dtype=np.float64)
                top = max(float(wide.max()), 1e-12)
                grey = (np.clip(wide, 0.0, None) * (255.0 / top) + 0.5).astype(np.uint8)
            else:
                grey = np.asarray(img.convert("L"))
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return grey, full_size


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask as ``uint8 [H, W]`` with values 0/1 (non-zero colour = 1, alpha ignored).

    Raises:
        DataError: the file is missing, not an image, or corrupt.
    """
    path = Path(path)
    with _open(path, "mask") as img:
        mode = img.mode
        try:
            arr = np.asarray(img)
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot decode mask ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3:
        if mode.endswith("A"):
            arr = arr[..., :-1]
        arr = arr.any(axis=-1)
    return (arr != 0).astype(np.uint8)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``[H, W, C]`` to ``size = (height, width)`` (area averaging when shrinking)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    shrink = image.shape[0] > height or image.shape[1] > width
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a ``uint8 [H, W]`` mask to ``size = (height, width)`` by nearest neighbour."""
    height, width = size
    if mask.shape[:2] == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
