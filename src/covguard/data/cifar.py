"""CIFAR-10 / CIFAR-100 python pickles (``cifar-10-batches-py``, ``cifar-100-python``).

The official files are pickled dicts: ``data`` (N, 3072) uint8 (1024 red, 1024 green, 1024 blue
values, each a 32x32 row-major plane), ``labels`` (CIFAR-10) or ``fine_labels`` /
``coarse_labels`` (CIFAR-100), plus ``filenames`` and ``batch_label``; the meta files hold the
class names. A pickle can run arbitrary code when loaded, so these files are read with
:class:`RestrictedUnpickler`, which resolves only the few numpy and codec globals such files
contain (array reconstruction, ``dtype``, scalars, and latin-1 byte strings) and refuses every
other global, e.g. ``os.system``. Keys are accepted as ``bytes`` (Python 2 / ``encoding="bytes"``
files) or ``str``.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import torch

from covguard.data.images import ImageSet, check_limit, check_size, images_from_arrays

__all__ = [
    "CIFAR10_CLASSES",
    "RestrictedUnpickler",
    "load_cifar10_pickle",
    "load_cifar100_pickle",
    "restricted_load",
]

# CIFAR-10 label order (batches.meta ``label_names``); also the sorted folder names.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR100_FILES = {"train": ("train",), "test": ("test",)}


def _numpy_attr(module: str, name: str):
    """``numpy._core.<module>.<name>`` (numpy 2) or ``numpy.core.<module>.<name>`` (numpy 1)."""
    import importlib

    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: only latin-1 is admitted."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin-1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_attr("multiarray", "_reconstruct")
    scalar = _numpy_attr("multiarray", "scalar")
    frombuffer = _numpy_attr("numeric", "_frombuffer")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):  # files written under numpy 1 or numpy 2
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR pickle holds (numpy arrays, latin-1 bytes).

    Dicts, lists, str, bytes and ints need no globals. Any other global (``os.system``,
    ``builtins.eval``, ``subprocess.Popen``, an ndarray subclass, ...) raises
    ``pickle.UnpicklingError`` before it can be called.
    """

    _ALLOWED: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str) -> object:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is forbidden in a CIFAR pickle (only numpy arrays are allowed)"
            ) from None


def restricted_load(path: str | Path) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="latin1"`` for Python 2 files).

    Raises
    ------
    pickle.UnpicklingError
        If the file references a forbidden global or is not a valid pickle; the message names
        the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR pickle not found: {str(path)!r}")
    with path.open("rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path}: {err}") from err
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
            raise pickle.UnpicklingError(
                f"{path}: not a valid CIFAR pickle ({type(err).__name__}: {err})"
            ) from err


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``data`` as (N, 32, 32, 3) uint8 and ``label_key`` as (N,) int64 from one batch file."""
    raw = restricted_load(path)
    if not isinstance(raw, dict):  # file content, not an argument: ValueError
        raise ValueError(f"{path}: expected a pickled dict; got {type(raw).__name__}")  # noqa: TRY004
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: missing key {key!r}; found {sorted(map(str, batch))}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (data.shape, data.dtype) if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072); got {got}")
    labels = np.asarray(batch[label_key])
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise ValueError(
            f"{path}: {label_key!r} must be {len(data)} integers; got {labels.shape} {labels.dtype}"
        )
    pixels = data.reshape(-1, 3, 32, 32).transpose(
        0, 2, 3, 1
    )  # (N, 3072) -> (N, 3, 32, 32) -> (N, 32, 32, 3)
    return pixels, labels.astype(np.int64)


def _names(path: Path, key: str) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    raw = restricted_load(path)
    if not isinstance(raw, dict):  # file content, not an argument: ValueError
        raise ValueError(f"{path}: expected a pickled dict; got {type(raw).__name__}")  # noqa: TRY004
    meta = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    names = meta.get(key)
    if names is None:
        return None
    return tuple(n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in names)


def _load(
    folder: Path,
    files: tuple[str, ...],
    label_key: str,
    classes: tuple[str, ...],
    *,
    name: str,
    size: int,
    limit: int | None,
) -> ImageSet:
    paths = [folder / f for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} lacks the CIFAR batch files {missing}")
    pixels, labels, count = [], [], 0
    for p in paths:
        x, y = _batch(p, label_key)
        pixels.append(x)
        labels.append(y)
        count += len(x)
        if limit is not None and count >= limit:
            break
    x = np.concatenate(pixels)[:limit]  # (N, 32, 32, 3)
    y = np.concatenate(labels)[:limit]  # (N,)
    if len(x) == 0:
        raise ValueError(f"{str(folder)!r}: the CIFAR batch files hold no images")
    if y.min() < 0 or y.max() >= len(classes):
        raise ValueError(
            f"{str(folder)!r}: labels must be in 0..{len(classes) - 1}; got {y.min()}..{y.max()}"
        )
    return ImageSet(
        images=images_from_arrays(x, size=size, name=name),
        labels=torch.from_numpy(y),
        classes=classes,
        name=name,
        source=str(folder),
    )


def load_cifar10_pickle(
    folder: str | Path,
    split: str = "test",
    *,
    size: int = 32,
    limit: int | None = None,
    name: str | None = None,
) -> ImageSet:
    """Load CIFAR-10 from the python pickles in ``cifar-10-batches-py``.

    Parameters
    ----------
    folder : str or Path
        The ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``, ``batches.meta``).
    split : {"train", "test"}, default="test"
    size : int, default=32
        Output side (32 keeps the pixels exact).
    limit : int, optional
        Keep only the first ``limit`` images (batch files are read in order until enough).

    Returns
    -------
    ImageSet
        ``images`` (N, 3, size, size) uint8 (N = 50000 or 10000), ``labels`` 0..9, ``classes``
        from ``batches.meta`` (:data:`CIFAR10_CLASSES` if the meta file is absent).
    """
    check_size(size)
    check_limit(limit)
    if split not in _CIFAR10_FILES:
        raise ValueError(f"split must be one of {sorted(_CIFAR10_FILES)}; got {split!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder must be the cifar-10-batches-py folder; got {str(folder)!r}")
    classes = _names(folder / "batches.meta", "label_names") or CIFAR10_CLASSES
    return _load(
        folder,
        _CIFAR10_FILES[split],
        "labels",
        classes,
        name=name or f"cifar10_pickle_{split}",
        size=size,
        limit=limit,
    )


def load_cifar100_pickle(
    folder: str | Path,
    split: str = "test",
    *,
    label: str = "fine",
    size: int = 32,
    limit: int | None = None,
    name: str | None = None,
) -> ImageSet:
    """Load CIFAR-100 from the python pickles in ``cifar-100-python``.

    Parameters
    ----------
    folder : str or Path
        The ``cifar-100-python`` folder (``train``, ``test``, ``meta``).
    split : {"train", "test"}, default="test"
    label : {"fine", "coarse"}, default="fine"
        Which labels to return: 100 fine classes or 20 superclasses.
    size : int, default=32
        Output side (32 keeps the pixels exact).
    limit : int, optional
        Keep only the first ``limit`` images.

    Returns
    -------
    ImageSet
        ``classes`` from ``meta`` (``fine_label_names`` / ``coarse_label_names``); without the
        meta file the class names are the label numbers as strings.
    """
    check_size(size)
    check_limit(limit)
    if split not in _CIFAR100_FILES:
        raise ValueError(f"split must be one of {sorted(_CIFAR100_FILES)}; got {split!r}")
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse'; got {label!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder must be the cifar-100-python folder; got {str(folder)!r}")
    count = 100 if label == "fine" else 20
    classes = _names(folder / "meta", f"{label}_label_names") or tuple(str(i) for i in range(count))
    return _load(
        folder,
        _CIFAR100_FILES[split],
        f"{label}_labels",
        classes,
        name=name or f"cifar100_pickle_{split}",
        size=size,
        limit=limit,
    )
