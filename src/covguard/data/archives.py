"""Image folders with one subfolder per class, as a directory or inside a tar archive.

Layout: ``<root>/<class>/<image>`` (``ImageFolder``'s). Class indices follow the sorted
subfolder names, so the CIFAR-10 folders ``airplane ... truck`` get the CIFAR-10 label order.
Images inside each set are ordered by path (sorted), whatever order the archive stores them in.

Tar archives are read in place with :mod:`tarfile` (``mode="r:*"``, any compression); nothing
is extracted to disk. Decoding is :func:`covguard.data.images.decode_image`; an image that fails
to decode, or is larger than :data:`~covguard.decode.MAX_IMAGE_BYTES`, is skipped with one
warning that counts the failures.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from covguard.decode import MAX_IMAGE_BYTES, DecodeError, read_image_file
from covguard.data.images import (
    BatchDecoder,
    ImageSet,
    check_limit,
    check_size,
)

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder", "load_image_tar", "open_tar"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _class_index(
    names: Sequence[str], classes: Sequence[str] | None, where: str
) -> tuple[tuple[str, ...], dict]:
    """Class tuple (sorted folder names unless given) and name -> index; checks given classes."""
    found = sorted(set(names))
    if classes is None:
        classes = tuple(found)
    else:
        classes = tuple(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{where}: class folders {unknown[:5]} are not in the given classes {classes}")
    return classes, {c: i for i, c in enumerate(classes)}


def load_image_folder(
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    size: int = 32,
    name: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ImageSet:
    """Load ``root/<class>/<image>`` files into an :class:`ImageSet`.

    Parameters
    ----------
    root : str or Path
        Folder holding one subfolder per class. Files that are not images (by extension) and
        files directly under ``root`` are ignored.
    classes : sequence of str, optional
        Class names in label order; default: the sorted subfolder names. A subfolder that is
        not in ``classes`` is an error.
    size : int, default=32
        Output side, see :mod:`covguard.data.images` for the resize.
    name : str, optional
        Name of the set; default: the folder name.
    limit : int, optional
        Read only the first ``limit`` images in sorted path order (for quick runs).
    progress : bool, default=True
        Show a tqdm bar while decoding.

    Returns
    -------
    ImageSet
        ``images`` (N, 3, size, size) uint8, ``labels`` (N,) int64 class indices.
    """
    check_size(size)
    check_limit(limit)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root must be an existing folder of class subfolders; got {str(root)!r}")
    files = sorted(p for p in root.glob("*/*") if p.is_file() and _is_image(p.name))
    if not files:
        raise ValueError(f"root {str(root)!r} holds no images in class subfolders (<root>/<class>/<image>)")
    classes, index = _class_index([p.parent.name for p in files], classes, str(root))
    files = files[:limit] if limit is not None else files
    decoder = BatchDecoder(len(files), size=size, name=name or root.name, source=str(root), progress=progress)
    for i, path in enumerate(files):
        try:
            decoder.add(i, str(path), read_image_file(path))
        except DecodeError as err:  # larger than MAX_IMAGE_BYTES, or unreadable
            decoder.fail(str(path), str(err))
    return decoder.finish(np.array([index[p.parent.name] for p in files]), classes)


def open_tar(path: str | Path) -> tarfile.TarFile:
    """Open a tar archive for reading (any compression), with an error naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tar archive not found: {str(path)!r}")
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{str(path)!r} is not a readable tar archive: {err}") from err


def tar_members(tar: tarfile.TarFile, path: str | Path) -> list[tarfile.TarInfo]:
    """All members of an open archive, with an error naming ``path`` if the archive is corrupt."""
    try:
        return tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{str(path)!r} is a corrupt tar archive: {err}") from err


def read_members(
    tar: tarfile.TarFile, members: Sequence[tarfile.TarInfo], decoder: BatchDecoder, path: str | Path
) -> None:
    """Decode ``members[i]`` into position ``i`` of ``decoder``, reading in storage order."""
    for i in sorted(range(len(members)), key=lambda j: members[j].offset):  # forward seeks only
        member = members[i]
        if member.size > MAX_IMAGE_BYTES:
            decoder.fail(member.name, f"member is {member.size} bytes, larger than the limit of {MAX_IMAGE_BYTES}")
            continue
        try:
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ValueError(f"{str(path)!r}: cannot read member {member.name!r}: {err}") from err
        decoder.add(i, member.name, data)


def load_image_tar(
    path: str | Path,
    *,
    prefix: str | None = None,
    classes: Sequence[str] | None = None,
    size: int = 32,
    name: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ImageSet:
    """Load a tar archive of ``<prefix>/<class>/<image>`` members into an :class:`ImageSet`.

    Parameters
    ----------
    path : str or Path
        The archive (``.tar``, ``.tar.gz``, ... any compression :mod:`tarfile` reads).
    prefix : str, optional
        Folder inside the archive that holds the class folders, e.g. ``"train"`` or
        ``"cifar100-jpeg/test"``. Default: inferred; it must then be the same for every image
        (the grandparent folder of each image member), else pass it explicitly.
    classes : sequence of str, optional
        Class names in label order; default: the sorted class folder names found in the whole
        archive (also when ``limit`` is set, so labels do not depend on ``limit``).
    size : int, default=32
        Output side, see :mod:`covguard.data.images` for the resize.
    name : str, optional
        Name of the set; default: the archive's file name.
    limit : int, optional
        Read only the first ``limit`` images in sorted member-path order (for quick runs).
    progress : bool, default=True
        Show a tqdm bar while decoding.

    Returns
    -------
    ImageSet
        ``images`` (N, 3, size, size) uint8 in sorted member-path order, ``labels`` (N,) int64.
    """
    check_size(size)
    check_limit(limit)
    name = name or Path(path).name
    with open_tar(path) as tar:
        members = [m for m in tar_members(tar, path) if m.isfile() and _is_image(m.name)]
        if prefix is not None:
            prefix = prefix.strip("/")
            members = [m for m in members if PurePosixPath(m.name).parent.parent == PurePosixPath(prefix)]
        if not members:
            where = f" under prefix {prefix!r}" if prefix is not None else ""
            raise ValueError(
                f"tar archive {str(path)!r} holds no images{where} in <prefix>/<class>/<image> members"
            )
        if prefix is None:
            roots = sorted({str(PurePosixPath(m.name).parent.parent) for m in members})
            if len(roots) > 1:
                raise ValueError(
                    f"tar archive {str(path)!r} holds class folders under several prefixes {roots[:5]}; "
                    "pass prefix= to pick one"
                )
        members.sort(key=lambda m: m.name)
        classes, index = _class_index(
            [PurePosixPath(m.name).parent.name for m in members], classes, str(path)
        )
        members = members[:limit] if limit is not None else members
        decoder = BatchDecoder(len(members), size=size, name=name, source=str(path), progress=progress)
        read_members(tar, members, decoder, path)
    return decoder.finish(np.array([index[PurePosixPath(m.name).parent.name] for m in members]), classes)
