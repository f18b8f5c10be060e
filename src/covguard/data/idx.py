"""MNIST-style IDX files (``t10k-images-idx3-ubyte[.gz]``), gzip-compressed or not.

IDX: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then each dimension as a
big-endian uint32, then the values big-endian in C order. Gzip is detected by its magic bytes,
not the file name.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from covguard.data.images import ImageSet, check_limit, check_size, images_from_arrays

__all__ = ["MNIST_CLASSES", "load_mnist", "read_idx"]

MNIST_CLASSES = tuple(str(d) for d in range(10))
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) into an array of its declared shape and type.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the header is not IDX or the payload size does not match the declared shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {str(path)!r}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{str(path)!r} is a corrupt gzip file: {err}") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _DTYPES or raw[3] == 0:
        raise ValueError(f"{str(path)!r} is not an IDX file (header {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{str(path)!r}: IDX header declares {ndim} dimensions but the file is {len(raw)} bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{str(path)!r}: IDX shape {shape} of {dtype} needs {expected} bytes of data; got {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(
    images: str | Path,
    labels: str | Path | None = None,
    *,
    size: int = 32,
    limit: int | None = None,
    name: str = "mnist",
) -> ImageSet:
    """Load MNIST (or any 8-bit IDX image file) as 3-channel ``size x size`` images.

    The 28x28 grayscale digits are resized as OpenOOD does (shorter side to ``size`` with PIL
    bilinear, then center crop; for 28 -> 32 that is a plain bilinear upsampling) and replicated
    into three channels (logged).

    Parameters
    ----------
    images : str or Path
        ``t10k-images-idx3-ubyte[.gz]``: uint8 of shape (N, H, W).
    labels : str or Path, optional
        ``t10k-labels-idx1-ubyte[.gz]``: uint8 of shape (N,). Without it labels are ``-1``.
    size : int, default=32
    limit : int, optional
        Keep only the first ``limit`` images.

    Returns
    -------
    ImageSet
        ``images`` (N, 3, size, size) uint8, ``labels`` 0..9, ``classes = ("0", ..., "9")``.
    """
    check_size(size)
    check_limit(limit)
    x = read_idx(images)
    if x.dtype != np.uint8 or x.ndim != 3:
        raise ValueError(f"images {str(images)!r} must hold uint8 (N, H, W); got {x.shape} {x.dtype}")
    if labels is None:
        y = np.full(len(x), -1, dtype=np.int64)
    else:
        y = read_idx(labels)
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            raise ValueError(
                f"labels {str(labels)!r} must hold {len(x)} integers to match images; got {y.shape} {y.dtype}"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"labels {str(labels)!r} must be digits 0..9; got {y.min()}..{y.max()}")
    x, y = x[:limit], y[:limit]
    if len(x) == 0:
        raise ValueError(f"images {str(images)!r} holds no images")
    return ImageSet(
        images=images_from_arrays(x, size=size, name=name),
        labels=torch.from_numpy(y.astype(np.int64)),
        classes=MNIST_CLASSES,
        name=name,
        source=str(images),
    )
