"""Decode untrusted image bytes with PIL: bounded, upright, and scaled by the mode's range.

Every image covguard reads (data set loaders, ``covguard score``, ``covguard heatmap``) goes
through :func:`open_image` and :func:`scaled_mode`:

- at most :data:`MAX_IMAGE_PIXELS` decoded pixels (checked from the header, before decoding);
  file reads are bounded by :data:`MAX_IMAGE_BYTES` (:func:`read_image_file`);
- EXIF orientation applied (``ImageOps.exif_transpose``): a photo with orientation 6 is
  decoded upright, as a viewer shows it;
- the first frame of an animated image;
- any failure of PIL (its plugins raise OSError, ValueError, SyntaxError, EOFError, TypeError,
  NotImplementedError, struct.error, ...) is one :class:`DecodeError`.

Pixel range by mode: 8-bit modes (``1 L P LA PA RGB RGBA RGBX CMYK YCbCr ...``) are left to
PIL's conversions (``1`` is 0 or 255, alpha is dropped, ``CMYK`` and ``P`` use PIL's rules);
16-bit grey (``I;16``, ``I;16B``, ...) is divided by 65535; 32-bit integer grey (``I``) is
divided by 65535 when its pixels lie in 0..65535 (16-bit PNG and TIFF data) and refused
otherwise; float grey (``F``) must lie in [0, 1] and is refused otherwise. Those three come
back as an ``F`` image in [0, 1], which keeps their precision.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from covguard.files import format_bytes, read_bounded

__all__ = ["DecodeError", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "open_image", "read_image_file", "scaled_mode", "to_uint8_mode"]

MAX_IMAGE_BYTES = 256 * 1024**2  # largest image file read
MAX_IMAGE_PIXELS = 50_000_000  # largest decoded image (W x H), e.g. a 48-megapixel photo
EIGHT_BIT_MODES = frozenset({"1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT = 65535.0


class DecodeError(ValueError):
    """An image file that cannot be read or decoded; the message says why."""


def read_image_file(path: str | Path, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image file; DecodeError if it is larger than ``max_bytes`` or unreadable."""
    try:
        return read_bounded(path, max_bytes, "image")
    except ValueError as err:
        raise DecodeError(str(err)) from err
    except OSError as err:
        raise DecodeError(f"cannot read image {str(path)!r} ({type(err).__name__}: {err.strerror or err})") from err


def open_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded bytes to a loaded PIL image, upright (EXIF orientation applied).

    Parameters
    ----------
    data : bytes
        PNG, JPEG, TIFF, ... anything PIL reads; the first frame of an animation.
    max_pixels : int
        Refuse images with more pixels (W x H), before decoding them.

    Raises
    ------
    DecodeError
        Whatever PIL raises, with the exception's name; too many pixels.
    """
    if len(data) == 0:
        raise DecodeError("cannot decode image: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DecodeError(
                        f"image is {width} x {height} = {width * height} pixels, more than the limit of {max_pixels}"
                    )
                img.load()
                return ImageOps.exif_transpose(img)  # a loaded copy, rotated per EXIF orientation
    except DecodeError:
        raise
    except UnidentifiedImageError as err:
        raise DecodeError(f"cannot decode image: not a format PIL identifies ({format_bytes(len(data))})") from err
    except MemoryError as err:
        raise DecodeError("cannot decode image: out of memory") from err
    except Exception as err:  # noqa: BLE001 (PIL's plugins raise many types; each is one bad image)
        raise DecodeError(f"cannot decode image ({type(err).__name__}: {err})") from err


def scaled_mode(img: Image.Image) -> Image.Image:
    """An 8-bit image unchanged, or a high bit-depth grey image as mode ``F`` scaled to [0, 1].

    Raises
    ------
    DecodeError
        A mode that cannot be scaled: ``I`` outside 0..65535, ``F`` outside [0, 1] or not
        finite, or a mode PIL cannot convert to ``L`` / ``RGB``.
    """
    mode = img.mode
    if mode in EIGHT_BIT_MODES:
        return img
    if mode.startswith("I;16"):
        pixels = np.asarray(img).astype(np.float32) / _SIXTEEN_BIT
    elif mode == "I":
        raw = np.asarray(img)
        low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if low < 0 or high > _SIXTEEN_BIT:
            raise DecodeError(
                f"image mode 'I' (32-bit integers) spans {low}..{high}; only 0..65535 (16-bit) can be scaled to [0, 1]"
            )
        pixels = raw.astype(np.float32) / _SIXTEEN_BIT
    elif mode == "F":
        pixels = np.asarray(img, dtype=np.float32)
        if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
            raise DecodeError(
                f"image mode 'F' (float) pixels must be finite and in [0, 1]; got {np.nanmin(pixels):.4g}..{np.nanmax(pixels):.4g}"
            )
    else:
        raise DecodeError(f"image mode {mode!r} cannot be converted to grey or RGB pixels")
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # mode F


def to_uint8_mode(img: Image.Image) -> Image.Image:
    """:func:`scaled_mode`, then an ``F`` image rounded to 8-bit ``L`` (for uint8 pipelines)."""
    img = scaled_mode(img)
    if img.mode != "F":
        return img
    return Image.fromarray(np.rint(np.asarray(img) * 255).astype(np.uint8))  # mode L
