"""Read image files to score (``covguard score``, ``covguard heatmap``): list, read, decode.

:func:`iter_images` lists a folder (recursive), a tar archive (any compression, read in place,
nothing extracted) or one file. A file that cannot be read (larger than
:data:`~covguard.decode.MAX_IMAGE_BYTES`, no permission, a tar member cut short) comes back
as an :class:`UnreadableImage`, empty bytes that carry the reason, and :func:`decode_image`
raises it as a :class:`~covguard.decode.DecodeError`: every bad image becomes one error,
and the other images are still read.

:func:`decode_image` turns bytes into float32 ``[0, 1]`` pixels of the model's input format:
decoded with :func:`~covguard.decode.open_image` (bounded pixels, EXIF orientation),
scaled by the mode's range, converted to ``L`` (1 channel) or ``RGB`` (3), resized to the fitted
input size with bilinear interpolation (no crop: the aspect ratio is not kept).
"""

from __future__ import annotations

import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from covguard.decode import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, DecodeError, open_image, read_image_file, scaled_mode
from covguard.files import format_bytes

__all__ = ["IMAGE_SUFFIXES", "ImageListing", "UnreadableImage", "decode_image", "iter_images", "list_images", "printable_name"]

#: Suffixes (lower case) that :func:`iter_images` reads from a folder or an archive.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)  # zlib / lzma / bz2 errors are OSError or ValueError


class UnreadableImage(bytes):
    """Empty bytes standing for an image file that could not be read; ``reason`` says why."""

    reason: str

    def __new__(cls, reason: str) -> UnreadableImage:
        self = super().__new__(cls, b"")
        self.reason = reason
        return self

    def __reduce__(self) -> tuple[type, tuple[str]]:  # pickled to decoding worker processes
        return UnreadableImage, (self.reason,)


@dataclass(frozen=True)
class ImageListing:
    """The images of a source, ready to read: see :func:`list_images`.

    Attributes
    ----------
    total : int
        Number of images.
    items : iterator of (str, bytes)
        Name and encoded bytes (or an :class:`UnreadableImage`), in reading order.
    name_order : bool
        True when ``items`` come sorted by name (equal names in reading order): a folder or a
        file always, a tar archive whose storage order is sorted by member name.
    """

    total: int
    items: Iterator[tuple[str, bytes]]
    name_order: bool


def printable_name(name: str) -> str:
    """A file or member name that encodes to UTF-8: undecodable bytes become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def iter_images(source: str | Path, *, order: str = "sorted") -> tuple[int, Iterator[tuple[str, bytes]]]:
    """List the images of a folder (recursive), a tar archive or a single file.

    Parameters
    ----------
    source : str or Path
        A folder (files with a suffix in :data:`IMAGE_SUFFIXES`, at any depth), a tar archive
        (``.tar``, ``.tar.gz``, ... the same members, read in place), or one image file.
    order : {"sorted", "archive"}
        ``"sorted"``: by name (the path relative to the folder, or the member name, as written).
        ``"archive"``: a tar's members in storage order, which reads a compressed archive in one
        stream (sort the results afterwards); a folder is sorted either way. A ``"sorted"`` read
        of an archive whose storage order is not sorted holds the bytes of every member in memory.

    Returns
    -------
    total : int
        Number of images.
    images : iterator of (str, bytes)
        The name (path relative to the folder, member name, or the file path; undecodable
        bytes written ``\\xNN``) and the encoded bytes, or an :class:`UnreadableImage`.

    Raises
    ------
    FileNotFoundError
        ``source`` does not exist.
    ValueError
        A tar archive whose member list cannot be read (truncated, corrupt).
    """
    if order not in ("sorted", "archive"):
        raise ValueError(f"order must be 'sorted' or 'archive'; got {order!r}")
    listing = list_images(source)
    if order == "archive" or listing.name_order:
        return listing.total, listing.items
    return listing.total, iter(sorted(listing.items, key=lambda item: item[0]))


def list_images(source: str | Path) -> ImageListing:
    """The images of a folder, a tar archive or a single file, in the order they are read fastest.

    A folder is listed sorted by name (relative path as written, ``\\xNN`` escapes included);
    a tar archive in storage order (one forward pass, one decompression stream), with
    :attr:`ImageListing.name_order` saying whether that order is sorted by name. Sources and
    errors as :func:`iter_images`.
    """
    source = Path(source)
    if source.is_dir():
        files = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        named = sorted((printable_name(p.relative_to(source).as_posix()), p) for p in files)
        return ImageListing(len(named), ((name, _read_file(p)) for name, p in named), name_order=True)
    if not source.is_file():
        raise FileNotFoundError(f"images {str(source)!r} is neither a folder nor a file")
    if _is_tar(source):
        stored = sorted(_tar_members(source), key=lambda m: m.offset)  # forward reads only: one decompression pass
        names = [printable_name(m.name) for m in stored]
        return ImageListing(len(stored), _read_tar(source, stored), name_order=names == sorted(names))
    return ImageListing(1, iter([(printable_name(str(source)), _read_file(source))]), name_order=True)


def decode_image(data: bytes, *, channels: int, size: tuple[int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """Decode an encoded image to float32 ``[0, 1]`` pixels of the model's input format.

    Parameters
    ----------
    data : bytes
        PNG, JPEG, ... anything PIL reads (or an :class:`UnreadableImage`).
    channels : {1, 3}
        1: ``convert("L")`` (ITU-R 601-2 luma); 3: ``convert("RGB")`` (grey replicated, alpha dropped).
    size : (int, int)
        Output (H, W); the image is resized with bilinear interpolation (PIL ``BILINEAR``),
        without cropping.
    max_pixels : int
        Refuse images with more pixels (W x H) before decoding them.

    Returns
    -------
    Tensor of shape (channels, H, W), float32

    Raises
    ------
    DecodeError
        (a ValueError) Whatever stops the image from being read or decoded.
    ValueError
        ``channels`` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB) to read image files; got {channels}")
    if isinstance(data, UnreadableImage):
        raise DecodeError(data.reason)
    img = scaled_mode(open_image(data, max_pixels=max_pixels))
    try:
        if img.mode != "F":
            img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
    except Exception as err:  # noqa: BLE001 (PIL's conversions of exotic modes)
        raise DecodeError(f"cannot convert image mode {img.mode!r} ({type(err).__name__}: {err})") from err
    if img.mode == "F":  # high bit depth, already in [0, 1]
        grey = torch.from_numpy(np.asarray(img, dtype=np.float32).clip(0, 1).copy())  # (H, W)
        return grey.expand(channels, -1, -1).contiguous()  # (C, H, W)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div_(255.0)  # (H, W) or (H, W, 3)
    return x[None] if channels == 1 else x.permute(2, 0, 1).contiguous()  # (C, H, W)


def _read_file(path: Path) -> bytes:
    try:
        return read_image_file(path)
    except DecodeError as err:
        return UnreadableImage(str(err))


def _is_tar(source: Path) -> bool:
    try:
        return tarfile.is_tarfile(source)
    except _TAR_ERRORS as err:
        raise ValueError(f"images {str(source)!r} cannot be read ({type(err).__name__}: {err})") from err


def _tar_members(source: Path) -> list[tarfile.TarInfo]:
    """The image members of an archive (one pass); links and special files are skipped with one warning."""
    try:
        with tarfile.open(source, mode="r:*") as archive:
            members = archive.getmembers()
            archive.fileobj.seek(archive.offset)  # where tarfile stopped: the end-of-archive zero block
            end = archive.fileobj.read(tarfile.BLOCKSIZE)
    except _TAR_ERRORS as err:
        raise ValueError(f"images {str(source)!r} is a truncated or corrupt tar archive ({type(err).__name__}: {err})") from err
    if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):  # tarfile stops silently at a cut header
        raise ValueError(
            f"images {str(source)!r} is a truncated tar archive: it ends inside a member at byte {archive.offset} "
            "of its (uncompressed) data, before the end-of-archive marker"
        )
    images = [m for m in members if Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
    skipped = [m for m in images if not m.isfile()]
    if skipped:
        warnings.warn(
            f"images {str(source)!r}: skipped {len(skipped)} archive members that are links or special files, "
            f"not image files (first: {printable_name(skipped[0].name)!r}); links are never followed",
            UserWarning,
            stacklevel=3,
        )
    return [m for m in images if m.isfile()]


def _read_tar(source: Path, members: list[tarfile.TarInfo]) -> Iterator[tuple[str, bytes]]:
    """Yield the members (in the given order); after a read error, the rest are unreadable too."""
    broken = None
    with tarfile.open(source, mode="r:*") as archive:
        for member in members:
            name = printable_name(member.name)
            if broken is not None:
                yield name, UnreadableImage(f"not read: the archive cannot be read past {broken}")
            elif member.size > MAX_IMAGE_BYTES:
                limit = format_bytes(MAX_IMAGE_BYTES)
                yield name, UnreadableImage(f"member is {format_bytes(member.size)}, larger than the limit of {limit}")
            else:
                try:
                    handle = archive.extractfile(member)
                    data = b"" if handle is None else handle.read()
                except _TAR_ERRORS as err:
                    broken = f"member {name!r} ({type(err).__name__}: {err})"
                    yield name, UnreadableImage(f"cannot read archive member ({type(err).__name__}: {err})")
                else:
                    yield name, data
