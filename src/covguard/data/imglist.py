"""OpenOOD ``benchmark_imglist`` files: one ``relative/path label`` line per image under a root.

OpenOOD v1.5 (``openood/datasets/imglist_dataset.py``) splits each line at the first space into
an image path relative to ``data_dir`` and an "extra" field, which is either an integer label or
a Python dict literal with a ``"label"`` key (read with ``ast.literal_eval``). OOD lists carry
label ``-1``. The same rules apply here, with errors that name the list file and line number:
paths may not be absolute, every listed file must exist, and a label must be ``-1`` or a valid
class index when the classes are known.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covguard.data.images import (
    BatchDecoder,
    ImageSet,
    check_limit,
    check_size,
)

__all__ = ["load_imglist", "read_imglist"]

_SHOW = 5  # missing files named in an error message


def read_imglist(path: str | Path) -> list[tuple[str, int]]:
    """Parse an imglist file into ``(relative_path, label)`` pairs; blank lines are skipped.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        On a line without a label, an absolute path, or a label that is neither an integer nor
        a dict literal with an integer ``"label"``; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"imglist file not found: {str(path)!r}")
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        tokens = line.split(" ", 1)
        if len(tokens) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'relative/path label'; got {line!r}")
        rel, extra = tokens[0], tokens[1].strip()
        if rel.startswith("/"):
            raise ValueError(f"{path}:{lineno}: image path must be relative to the root; got {rel!r}")
        try:
            value = ast.literal_eval(extra)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, dict):
            value = value.get("label")
        if isinstance(value, bool) or not isinstance(value, int):  # a parse error in the file
            raise ValueError(  # noqa: TRY004
                f"{path}:{lineno}: label must be an integer or {{'label': int}}; got {extra!r}"
            )
        entries.append((rel, value))
    if not entries:
        raise ValueError(f"imglist file {str(path)!r} lists no images")
    return entries


def load_imglist(
    imglist: str | Path,
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    size: int = 32,
    name: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ImageSet:
    """Load the images an OpenOOD imglist names, in the list's order.

    Parameters
    ----------
    imglist : str or Path
        The list file (``benchmark_imglist/cifar10/test_tin.txt`` for example).
    root : str or Path
        Folder the listed paths are relative to (OpenOOD's ``data_dir``, e.g.
        ``data/images_classic``).
    classes : sequence of str, optional
        Class names in label order; labels must then be ``-1`` or ``< len(classes)``.
    num_classes : int, optional
        Number of classes when names are not known; same check as ``classes``.
    size : int, default=32
        Output side, see :mod:`covguard.data.images` for the resize.
    name : str, optional
        Name of the set; default: the list's file stem.
    limit : int, optional
        Read only the first ``limit`` lines.
    progress : bool, default=True
        Show a tqdm bar while decoding.

    Returns
    -------
    ImageSet
        ``labels`` as listed (``-1`` for OOD lists).

    Raises
    ------
    FileNotFoundError
        If the list, the root, or any listed image is missing (the message counts and names
        the first missing files).
    ValueError
        On a malformed line, or a label outside ``-1 .. K-1`` (unknown class) when ``classes``
        or ``num_classes`` is given.
    """
    check_size(size)
    check_limit(limit)
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"classes has {len(classes)} names but num_classes={num_classes}")
    imglist, root = Path(imglist), Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root must be an existing folder; got {str(root)!r}")
    entries = read_imglist(imglist)
    entries = entries[:limit] if limit is not None else entries
    k = len(classes) if classes is not None else num_classes
    if k is not None:
        for rel, label in entries:
            if not -1 <= label < k:
                raise ValueError(
                    f"{imglist}: image {rel!r} has label {label}, an unknown class "
                    f"(expected -1 or 0..{k - 1})"
                )
    paths = [root / rel for rel, _ in entries]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"imglist {str(imglist)!r} points at {len(missing)} missing files under root {str(root)!r}, "
            f"e.g. {missing[:_SHOW]}"
        )
    name = name or imglist.stem
    decoder = BatchDecoder(len(paths), size=size, name=name, source=str(imglist), progress=progress)
    for i, p in enumerate(paths):
        decoder.add(i, str(p), p.read_bytes())
    return decoder.finish(np.array([label for _, label in entries]), tuple(classes or ()))
