"""Decoded image sets: the ``ImageSet`` record, decoding to RGB, and OpenOOD's 32x32 test resize.

Every real-data loader in :mod:`covguard.data` returns an :class:`ImageSet` of uint8 pixels,
``(N, 3, S, S)`` with ``S = 32`` by default. Pixels stay uint8 until :meth:`ImageSet.float`
(or :meth:`ImageSet.to_dataset`), the one place that converts them to float32 in ``[0, 1]``;
covguard's models normalize their input internally (mean/std), so no loader normalizes.

How an image becomes ``(3, S, S)`` uint8, as OpenOOD v1.5's test preprocessing for the CIFAR
benchmarks does (``Convert('RGB')``, ``Resize(32, BILINEAR)``, ``CenterCrop(32)`` in
``openood/evaluation_api/preprocessor.py`` and ``openood/preprocessors/transform.py``):

1. ``PIL.Image.convert("RGB")``. Grayscale (``L``, ``1``, ``LA``, ``I``) is replicated into the
   three channels; ``RGBA``/``LA`` drop alpha (no compositing); ``CMYK``, ``YCbCr`` and palette
   images use PIL's own conversion. The number of grayscale images replicated is logged
   (``logging.INFO``) per data set, never silently.
2. If the shorter side is not ``S``: resize so that the shorter side is ``S`` and the longer is
   ``int(S * long / short)`` (torchvision's rule), with ``PIL.Image.resize(..., Image.BILINEAR)``.
   PIL's bilinear filter is antialiased when downsampling (its support grows with the scale
   factor), which is what torchvision's ``Resize`` does on PIL images.
3. Center crop ``S x S`` with torchvision's anchor ``top = int(round((h - S) / 2))``,
   ``left = int(round((w - S) / 2))``.

Images of mixed sizes are therefore fine: each one is resized on its own; an image already
``S x S`` is left untouched (CIFAR pixels are bit-exact).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from covguard.decode import DecodeError, open_image, to_uint8_mode

__all__ = [
    "DecodeError",
    "ImageSet",
    "decode_image",
    "images_from_arrays",
    "jpeg_matched",
    "to_rgb_array",
]

logger = logging.getLogger(__name__)

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Decoded images with their labels, as every covguard real-data loader returns them.

    Attributes
    ----------
    images : Tensor of shape (N, 3, S, S), uint8
        RGB pixels, ``S = 32`` unless a loader was asked for another size.
    labels : Tensor of shape (N,), int64
        Class indices into ``classes``; ``-1`` where the label is unknown.
    classes : tuple of str
        ``classes[k]`` names label ``k``; empty when the set has no class names.
    name : str
        Short name of the set (``"cifar10_test"``, ``"tin"``, ...).
    source : str
        Path of the file or folder the images were read from.
    skipped : int
        Source images that failed to decode and are missing from the set (warned about).

    Examples
    --------
    >>> data = ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, -1]), ("cat",))
    >>> x = data.float()  # the one conversion to floats in [0, 1]
    >>> tuple(x.shape), x.dtype, len(data)
    ((2, 3, 32, 32), torch.float32, 2)
    """

    images: Tensor  # (N, 3, S, S) uint8
    labels: Tensor  # (N,) int64, -1 = unknown
    classes: tuple[str, ...] = ()
    name: str = ""
    source: str = ""
    skipped: int = 0  # images that failed to decode

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            dtype = getattr(x, "dtype", None)
            raise ValueError(f"images must be a uint8 tensor of shape (N, 3, H, W); got {got} {dtype}")
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"labels must be an int64 tensor of shape ({x.shape[0]},); got {got} {getattr(y, 'dtype', None)}"
            )
        if not isinstance(self.classes, tuple) or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be a tuple of str; got {self.classes!r}")
        if len(y) and int(y.min()) < -1:
            raise ValueError(f"labels must be >= -1 (-1 = unknown); got min {int(y.min())}")
        if self.classes and len(y) and int(y.max()) >= len(self.classes):
            raise ValueError(f"labels must be < len(classes) = {len(self.classes)}; got max {int(y.max())}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def float(self) -> Tensor:
        """Pixels as float32 in ``[0, 1]``, shape ``(N, 3, S, S)``: ``images / 255``.

        This is the one place where covguard turns pixels into floats; models apply their own
        normalization (mean/std) inside ``forward``.
        """
        return self.images.to(torch.float32).div_(255.0)

    def to_dataset(self) -> TensorDataset:
        """``TensorDataset(self.float(), self.labels)``: ``(x, y)`` pairs for a ``DataLoader``."""
        return TensorDataset(self.float(), self.labels)

    def head(self, n: int) -> ImageSet:
        """The first ``n`` images (all of them if ``n >= len(self)``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer; got {n!r}")
        return ImageSet(self.images[:n], self.labels[:n], self.classes, self.name, self.source, self.skipped)


def to_rgb_array(img: Image.Image, size: int = 32) -> tuple[np.ndarray, bool]:
    """Convert a PIL image to RGB and resize/center-crop it to ``size x size`` as OpenOOD does.

    Grayscale images are replicated into three channels by ``convert("RGB")``; the caller is
    told (second return value) so that it can count and log them.

    Parameters
    ----------
    img : PIL.Image.Image
        Any mode PIL can convert to RGB.
    size : int, default=32
        Side of the output.

    Returns
    -------
    pixels : ndarray of shape (size, size, 3), uint8
    was_gray : bool
        True if the source was a single-channel (grayscale) image.
    """
    was_gray = img.mode in _GRAY_MODES
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:  # torchvision Resize(int): shorter side -> size, longer side truncated
        other = int(size * long / short)
        img = img.resize((size, other) if w <= h else (other, size), Image.BILINEAR)
        w, h = img.size
    if (w, h) != (size, size):  # torchvision CenterCrop anchor
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)  # Python's round, as torchvision
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8), was_gray


def decode_image(data: bytes, size: int = 32) -> tuple[np.ndarray, bool]:
    """Decode an encoded image (JPEG, PNG, ...) to ``(size, size, 3)`` uint8 RGB.

    Decoding is :func:`covguard.decode.open_image` (bounded pixels, EXIF orientation
    applied; truncated files are errors: PIL's ``LOAD_TRUNCATED_IMAGES``, which OpenOOD
    switches on globally, is left off), high bit-depth modes are scaled to 8 bits by their
    range (:func:`~covguard.decode.scaled_mode`), then :func:`to_rgb_array` converts
    and resizes. Raises :class:`DecodeError` for any failure.
    """
    img = to_uint8_mode(open_image(data))
    try:
        return to_rgb_array(img, size)
    except Exception as err:  # noqa: BLE001 (PIL's conversions of exotic modes)
        raise DecodeError(f"cannot convert image mode {img.mode!r} to RGB ({type(err).__name__}: {err})") from err


class BatchDecoder:
    """Decode many encoded images into one preallocated array, counting failures.

    Items are added by position ``index`` in the final order (a loader may read an archive in
    storage order and place images in sorted order). :meth:`finish` drops the positions that
    failed, emits ONE warning counting them, logs how many grayscale images were replicated,
    raises if nothing was decoded, and returns the :class:`ImageSet`.
    """

    def __init__(self, total: int, *, size: int, name: str, source: str, progress: bool) -> None:
        self.pixels = np.zeros((total, size, size, 3), dtype=np.uint8)  # (N, S, S, 3)
        self.ok = np.zeros(total, dtype=bool)
        self.size, self.name, self.source = size, name, source
        self.gray = 0
        self.failed: list[tuple[str, str]] = []
        self.bar = tqdm(total=total, desc=f"decoding {name}", unit="img", disable=not progress, leave=False)

    def fail(self, key: str, reason: str) -> None:
        """Count an image that could not be read (left out of the set, warned about by :meth:`finish`)."""
        self.failed.append((key, reason))
        self.bar.update(1)

    def add(self, index: int, key: str, data: bytes) -> None:
        try:
            pixels, was_gray = decode_image(data, self.size)
        except DecodeError as err:
            self.failed.append((key, str(err)))
        else:
            self.pixels[index] = pixels
            self.ok[index] = True
            self.gray += was_gray
        self.bar.update(1)

    def finish(self, labels: np.ndarray, classes: Sequence[str]) -> ImageSet:
        """The decoded images with ``labels`` (one per added position, failures dropped)."""
        self.bar.close()
        total = len(self.ok)
        if self.failed:
            key, err = self.failed[0]
            warnings.warn(
                f"{self.source}: skipped {len(self.failed)} of {total} images that failed to decode "
                f"(first: {key}: {err})",
                stacklevel=3,
            )
        if not self.ok.any():
            raise ValueError(f"{self.source}: no image could be decoded ({total} tried)")
        if self.gray:
            logger.info(
                "%s: converted %d of %d grayscale images to RGB by channel replication",
                self.name,
                self.gray,
                total,
            )
        pixels = self.pixels[self.ok]  # (N, S, S, 3)
        return ImageSet(
            images=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))),  # (N, 3, S, S)
            labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)[self.ok]),
            classes=tuple(classes),
            name=self.name,
            source=self.source,
            skipped=len(self.failed),
        )


def images_from_arrays(
    arrays: np.ndarray, *, size: int = 32, name: str = "", progress: bool = False
) -> Tensor:
    """Stack decoded pixel arrays into ``(N, 3, size, size)`` uint8, resizing as OpenOOD does.

    Parameters
    ----------
    arrays : ndarray of shape (N, H, W) or (N, H, W, 3), uint8
        Grayscale ``(N, H, W)`` arrays are replicated into three channels (logged).
    size : int, default=32
        Side of the output; arrays already ``size x size`` RGB are only transposed.

    Returns
    -------
    Tensor of shape (N, 3, size, size), uint8
    """
    arrays = np.asarray(arrays)
    if arrays.dtype != np.uint8 or arrays.ndim not in (3, 4) or (arrays.ndim == 4 and arrays.shape[3] != 3):
        raise ValueError(f"arrays must be uint8 (N, H, W) or (N, H, W, 3); got {arrays.shape} {arrays.dtype}")
    gray = arrays.ndim == 3
    if gray:
        logger.info("%s: converted %d grayscale images to RGB by channel replication", name, len(arrays))
    if arrays.shape[1:3] == (size, size):
        rgb = np.repeat(arrays[..., None], 3, axis=3) if gray else arrays  # (N, S, S, 3)
    else:
        rgb = np.empty((len(arrays), size, size, 3), dtype=np.uint8)  # (N, S, S, 3)
        for i, a in enumerate(
            tqdm(arrays, desc=f"resizing {name}", unit="img", disable=not progress, leave=False)
        ):
            rgb[i], _ = to_rgb_array(Image.fromarray(a, "L" if gray else "RGB"), size)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)))  # (N, 3, S, S)


def jpeg_matched(images: Tensor, quality: int = 75) -> Tensor:
    """Re-encode images as JPEG (PIL, ``quality``, chroma subsampling 4:2:0) and decode them.

    The CIFAR-10 copy in ``shared/data`` is JPEG at PIL quality 75, 4:2:0; applying the same
    round trip to a lossless OOD set (MNIST) removes compression as a cue, so a detector cannot
    separate the sets by spotting JPEG artifacts. Report such sets both as they are and matched.

    Parameters
    ----------
    images : Tensor of shape (N, 3, H, W), uint8
    quality : int, default=75
        PIL JPEG quality, 1..95.

    Returns
    -------
    Tensor of shape (N, 3, H, W), uint8
    """
    if (
        not isinstance(images, Tensor)
        or images.dtype != torch.uint8
        or images.dim() != 4
        or images.shape[1] != 3
    ):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor of shape (N, 3, H, W); got {got}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"quality must be an integer in 1..95; got {quality!r}")
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3)
    out = np.empty_like(hwc)
    for i, a in enumerate(hwc):
        buf = io.BytesIO()
        Image.fromarray(a, "RGB").save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
        with Image.open(io.BytesIO(buf.getvalue())) as img:
            out[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def check_size(size: int) -> None:
    """Validate the ``size`` argument shared by every loader."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer; got {size!r}")


def check_limit(limit: int | None) -> None:
    """Validate the ``limit`` argument shared by every loader."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive integer; got {limit!r}")
