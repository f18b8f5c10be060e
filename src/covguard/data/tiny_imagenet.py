"""Tiny ImageNet validation set (``tiny-imagenet-200/val``), as a folder or inside a tar archive.

Layout: ``tiny-imagenet-200/val/images/val_<i>.JPEG`` (64x64, some grayscale),
``tiny-imagenet-200/val/val_annotations.txt`` (tab-separated ``file  wnid  x0  y0  x1  y1``)
and ``tiny-imagenet-200/wnids.txt`` (the 200 WordNet ids). Images come out in ``val_<i>`` order
(i = 0, 1, 2, ...), resized to 32x32 as OpenOOD does (PIL bilinear, antialiased, see
:mod:`covguard.data.images`), grayscale replicated into RGB (logged). ``classes`` are the sorted
wnids (the label order of an ``ImageFolder`` over ``tiny-imagenet-200/train``).

Difference from OpenOOD v1.5: its ``test_tin.txt`` for CIFAR-10 drops the Tiny ImageNet images
whose classes overlap CIFAR-10/100; that list is not reproduced here, so all 10,000 validation
images are returned.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np

from covguard.data.archives import open_tar, read_members, tar_members
from covguard.data.images import (
    BatchDecoder,
    ImageSet,
    check_limit,
    check_size,
)

__all__ = ["load_tiny_imagenet_val"]

_ANNOTATIONS = "val/val_annotations.txt"
_SHOW = 5  # missing files named in an error message


def _natural_key(name: str) -> tuple[int, str]:
    match = re.search(r"(\d+)\D*$", name)
    return (int(match.group(1)) if match else -1, name)


def _parse(annotations: str, wnids: str | None, where: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """``file -> wnid`` from val_annotations.txt and the sorted class wnids."""
    labels = {}
    for lineno, line in enumerate(annotations.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{where}/{_ANNOTATIONS}:{lineno}: expected 'file<TAB>wnid...'; got {line!r}")
        labels[fields[0].strip()] = fields[1].strip()
    if not labels:
        raise ValueError(f"{where}/{_ANNOTATIONS} lists no images")
    if wnids is None:
        classes = tuple(sorted(set(labels.values())))
    else:
        classes = tuple(sorted(w.strip() for w in wnids.splitlines() if w.strip()))
        unknown = sorted(set(labels.values()) - set(classes))
        if unknown:
            raise ValueError(f"{where}/{_ANNOTATIONS} names wnids missing from wnids.txt: {unknown[:_SHOW]}")
    return labels, classes


def _select(labels: dict[str, str], available: set[str], where: str, limit: int | None) -> list[str]:
    """Annotated files in ``val_<i>`` order (first ``limit``), checking that each one exists."""
    files = sorted(labels, key=_natural_key)[:limit]
    missing = [f for f in files if f not in available]
    if missing:
        raise FileNotFoundError(
            f"{where}/{_ANNOTATIONS} names {len(missing)} images missing from {where}/val/images, "
            f"e.g. {missing[:_SHOW]}"
        )
    return files


def _finish(
    decoder: BatchDecoder,
    files: list[str],
    labels: dict[str, str],
    classes: tuple[str, ...],
) -> ImageSet:
    index = {c: i for i, c in enumerate(classes)}
    return decoder.finish(np.array([index[labels[f]] for f in files]), classes)


def _from_folder(base: Path, *, size: int, limit: int | None, progress: bool, name: str) -> ImageSet:
    wnids = base / "wnids.txt"
    labels, classes = _parse(
        (base / _ANNOTATIONS).read_text(encoding="utf-8"),
        wnids.read_text(encoding="utf-8") if wnids.is_file() else None,
        str(base),
    )
    images = base / "val" / "images"
    available = {p.name for p in images.iterdir() if p.is_file()} if images.is_dir() else set()
    files = _select(labels, available, str(base), limit)
    decoder = BatchDecoder(len(files), size=size, name=name, source=str(base), progress=progress)
    for i, f in enumerate(files):
        decoder.add(i, f, (images / f).read_bytes())
    return _finish(decoder, files, labels, classes)


def _from_tar(path: Path, *, size: int, limit: int | None, progress: bool, name: str) -> ImageSet:
    with open_tar(path) as tar:
        members = {PurePosixPath(m.name): m for m in tar_members(tar, path) if m.isfile()}
        bases = sorted(
            {str(n.parent.parent) for n in members if n.parts[-2:] == ("val", "val_annotations.txt")}
        )
        if len(bases) != 1:
            raise ValueError(
                f"tar archive {str(path)!r} must hold exactly one tiny-imagenet-200/{_ANNOTATIONS}; "
                f"found {len(bases)}"
            )
        base = PurePosixPath(bases[0])

        def text(rel: str) -> str | None:
            member = members.get(base / rel)
            return None if member is None else tar.extractfile(member).read().decode("utf-8")

        where = f"{path}:{base}"
        labels, classes = _parse(text(_ANNOTATIONS), text("wnids.txt"), where)
        folder = base / "val" / "images"
        images = {n.name: m for n, m in members.items() if n.parent == folder}
        files = _select(labels, set(images), where, limit)
        decoder = BatchDecoder(len(files), size=size, name=name, source=str(path), progress=progress)
        read_members(tar, [images[f] for f in files], decoder, path)
    return _finish(decoder, files, labels, classes)


def load_tiny_imagenet_val(
    path: str | Path,
    *,
    size: int = 32,
    limit: int | None = None,
    progress: bool = True,
    name: str = "tin",
) -> ImageSet:
    """Load the Tiny ImageNet validation images with their labels.

    Parameters
    ----------
    path : str or Path
        The ``tiny-imagenet-200`` folder (or a folder that contains it), or a tar archive of it
        (``tiny-imagenet-200-val.tar``, any compression).
    size : int, default=32
        Output side; the 64x64 images are downsampled with PIL's antialiased bilinear filter.
    limit : int, optional
        Read only the first ``limit`` images (``val_0``, ``val_1``, ...).
    progress : bool, default=True
        Show a tqdm bar while decoding.

    Returns
    -------
    ImageSet
        ``images`` (N, 3, size, size) uint8, ``labels`` (N,) indices into ``classes`` (sorted
        wnids, 200 for the full set).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or the annotations name images that are missing.
    ValueError
        If the layout is not Tiny ImageNet's, or an annotation names a wnid absent from wnids.txt.
    """
    check_size(size)
    check_limit(limit)
    path = Path(path)
    if path.is_file():
        return _from_tar(path, size=size, limit=limit, progress=progress, name=name)
    for base in (path, path / "tiny-imagenet-200"):
        if (base / _ANNOTATIONS).is_file():
            return _from_folder(base, size=size, limit=limit, progress=progress, name=name)
    raise FileNotFoundError(
        f"path must be a tiny-imagenet-200 folder (with {_ANNOTATIONS}) or a tar archive of it; got {str(path)!r}"
    )
