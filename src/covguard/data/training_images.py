"""Training images for ``covguard fit``, read from a folder or a tar archive and decoded as ``covguard score`` decodes them.

Layout (``--train PATH``), a folder or a tar archive (any compression, read in place):

- labeled (``--detector class``): ``<class>/<image>``, as ``torchvision``'s ``ImageFolder`` and
  :func:`covguard.data.archives.load_image_folder`: labels follow the **sorted class folder
  names**. In a folder, a class is a subfolder of PATH (its images at any depth below it); in
  a tar archive, a class is the parent folder of each image, under one common prefix (as
  :func:`~covguard.data.archives.load_image_tar`).
- unlabeled (``--detector simple``): any images, at any depth (labels are not read).

Images are decoded with :func:`covguard.guard.decode_image` (PIL, converted to the model's input
channels, bilinear resize without crop, float32 in ``[0, 1]``), so that a guard sees the same
pixels at fit and at score time. The input size is the most common image size, and images of
another size are resized with one warning (or ``image_size``, given: no warning). Files PIL
cannot read are skipped, with one warning.
"""

from __future__ import annotations

import io
import logging
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor
from tqdm.auto import tqdm

from covguard.guard import IMAGE_SUFFIXES, decode_image

__all__ = ["TrainingImages", "read_training_images"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TrainingImages:
    """Decoded training images, as ``covguard score`` would see them.

    Attributes
    ----------
    images : Tensor of shape (N, C, H, W), uint8
        Pixels; :meth:`float` gives the model's input.
    labels : Tensor of shape (N,), int64, or None
        Indices into ``classes`` (None for unlabeled images).
    classes : tuple of str
        Sorted class folder names (empty for unlabeled images).
    names : tuple of str
        Path of each image relative to the folder, or its member name in the archive.
    source : str
        The folder or archive.
    resized : int
        Images that were not ``H x W`` and were resized.
    skipped : int
        Files that could not be decoded (not in ``images``).
    """

    images: Tensor
    labels: Tensor | None
    classes: tuple[str, ...]
    names: tuple[str, ...]
    source: str
    resized: int = 0
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def float(self, index: Tensor | None = None) -> Tensor:
        """Images (of ``index``) as float32 ``[0, 1]``, (n, C, H, W): bit-identical to :func:`covguard.guard.decode_image`."""
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0)


# ---- listing and decoding ----------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _list_folder(root: Path, labeled: bool) -> list[tuple[str, str | None, Path]]:
    """(name, class or None, file) of every image under ``root``, in sorted name order."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name))
    if not files:
        raise ValueError(f"--train {str(root)!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    entries = [(p.relative_to(root).as_posix(), p) for p in files]
    if not labeled:
        return [(name, None, p) for name, p in entries]
    loose = [name for name, _ in entries if "/" not in name]
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if loose:
        where = f"and class folders {class_dirs[:5]}" if class_dirs else "and no class folders"
        raise ValueError(
            f"--train {str(root)!r} holds images directly under it ({loose[:3]}) {where}: --detector class needs "
            "labeled images in <class>/<image> folders; use --detector simple for unlabeled images"
        )
    with_images = {name.split("/", 1)[0] for name, _ in entries}
    empty = [c for c in class_dirs if c not in with_images]
    if empty:
        raise ValueError(f"--train {str(root)!r}: class folders {empty[:5]} hold no images")
    return [(name, name.split("/", 1)[0], p) for name, p in entries]


def _list_tar(path: Path, labeled: bool) -> list[tuple[str, str | None, tarfile.TarInfo]]:
    """(member name, class or None, member) of every image member, in sorted name order."""
    from covguard.data.archives import open_tar, tar_members

    with open_tar(path) as archive:
        members = tar_members(archive, path)
    images = sorted((m for m in members if m.isfile() and _is_image(m.name)), key=lambda m: m.name)
    if not images:
        raise ValueError(f"--train {str(path)!r} is a tar archive without image members ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not labeled:
        return [(m.name, None, m) for m in images]
    parts = [PurePosixPath(m.name) for m in images]
    loose = [m.name for m, p in zip(images, parts) if str(p.parent) in ("", ".")]
    if loose:
        raise ValueError(
            f"--train {str(path)!r} holds images at the top of the archive ({loose[:3]}): --detector class needs "
            "labeled images in <class>/<image> members; use --detector simple for unlabeled images"
        )
    prefixes = sorted({str(p.parent.parent) for p in parts})
    if len(prefixes) > 1:
        raise ValueError(
            f"--train {str(path)!r} holds images under several folders {prefixes[:5]}: a labeled archive needs "
            "<prefix>/<class>/<image> members with one prefix"
        )
    prefix = PurePosixPath(prefixes[0])
    with_images = {p.parent.name for p in parts}
    empty = sorted(
        PurePosixPath(m.name).name for m in members
        if m.isdir() and PurePosixPath(m.name).parent == prefix and PurePosixPath(m.name).name not in with_images
    )
    if empty:
        raise ValueError(f"--train {str(path)!r}: class folders {empty[:5]} hold no images")
    return [(m.name, p.parent.name, m) for m, p in zip(images, parts)]


def _read_bytes(path: Path, labeled: bool) -> tuple[int, Iterator[tuple[str, str | None, bytes]]]:
    """Number of images and an iterator of (name, class, encoded bytes)."""
    if path.is_dir():
        entries = _list_folder(path, labeled)
        return len(entries), ((name, c, p.read_bytes()) for name, c, p in entries)
    if not path.exists():
        raise FileNotFoundError(f"--train {str(path)!r} does not exist")
    if not tarfile.is_tarfile(path):
        raise ValueError(f"--train {str(path)!r} must be a folder or a tar archive of images")
    entries = _list_tar(path, labeled)

    def read() -> Iterator[tuple[str, str | None, bytes]]:
        with tarfile.open(path, mode="r:*") as archive:
            for name, c, member in entries:
                handle = archive.extractfile(member)
                yield name, c, b"" if handle is None else handle.read()

    return len(entries), read()


def _image_size(data: bytes) -> tuple[int, int] | str:
    """(H, W) from the image header, or the reason PIL cannot read it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            return img.size[1], img.size[0]
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def read_training_images(
    path: str | Path,
    *,
    channels: int,
    labeled: bool,
    image_size: tuple[int, int] | None = None,
    progress: bool = True,
) -> TrainingImages:
    """Read and decode the images of a folder or tar archive (see the module docstring for the layout).

    Parameters
    ----------
    path : str or Path
        Folder or tar archive.
    channels : {1, 3}
        The model's input channels (PIL ``L`` or ``RGB``).
    labeled : bool
        Read ``<class>/<image>`` labels (sorted class names -> 0, 1, ...).
    image_size : (int, int), optional
        Input (H, W); default: the most common size among the images.
    progress : bool
        Show progress bars.

    Returns
    -------
    TrainingImages

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        No images; images outside class folders or an empty class folder (``labeled``); no
        image could be decoded.
    """
    path = Path(path)
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise ValueError(f"--image-size must be two positive integers H W; got {image_size}")
    total, items = _read_bytes(path, labeled)
    found: list[tuple[str, str | None, bytes, tuple[int, int]]] = []
    failed: list[tuple[str, str]] = []
    classes = set()  # every class folder with image files, decodable or not: labels do not shift
    for name, c, data in tqdm(items, total=total, desc="read", unit="img", disable=not progress, leave=False):
        classes.add(c)
        size = _image_size(data)
        if isinstance(size, str):
            failed.append((name, size))
        else:
            found.append((name, c, data, size))
    sizes = Counter(size for *_, size in found)
    target = tuple(image_size) if image_size is not None else (sizes.most_common(1)[0][0] if sizes else (1, 1))
    kept, pixels = [], []
    for name, c, data, size in tqdm(found, desc="decode", unit="img", disable=not progress, leave=False):
        try:
            x = decode_image(data, channels=channels, size=target)  # (C, H, W) float32, k / 255
        except ValueError as err:  # a header that reads, a body that does not (truncated file)
            failed.append((name, str(err)))
            continue
        kept.append((name, c, size))
        pixels.append(x.mul_(255.0).round_().to(torch.uint8))
    if failed:
        warnings.warn(
            f"--train {str(path)!r}: skipped {len(failed)} of {total} files that cannot be decoded "
            f"(first: {failed[0][0]}: {failed[0][1]})",
            UserWarning,
            stacklevel=2,
        )
    if not kept:
        raise ValueError(f"--train {str(path)!r}: none of its {total} image files can be decoded")
    resized = sum(size != target for *_, size in kept)
    if resized and image_size is not None:
        logger.info("%s: resized %d of %d images to %dx%d", path, resized, len(kept), *target)
    elif resized:
        shown = ", ".join(f"{h}x{w}" for h, w in list(sizes)[:5])
        warnings.warn(
            f"--train {str(path)!r}: {resized} of {len(kept)} images are not {target[0]}x{target[1]} "
            f"(sizes found: {shown}); they are resized to {target[0]}x{target[1]} with bilinear interpolation, "
            "no crop, as covguard score resizes",
            UserWarning,
            stacklevel=2,
        )
    pixels = torch.stack(pixels)  # (N, C, H, W) uint8
    names = tuple(name for name, *_ in kept)
    if not labeled:
        return TrainingImages(pixels, None, (), names, str(path), resized, len(failed))
    classes = tuple(sorted(classes))
    index = {c: k for k, c in enumerate(classes)}
    labels = torch.tensor([index[c] for _, c, *_ in kept], dtype=torch.int64)
    return TrainingImages(pixels, labels, classes, names, str(path), resized, len(failed))
