"""The CIFAR-10 benchmark's named image sets, resolved under a data root and cached once decoded.

``SETS`` maps each name to the relative path(s) it expects under the data root (alternatives
are tried in order) and to the loader that reads them:

- ``cifar10_train`` / ``cifar10_test``: ``cifar10-jpeg/{train,test}.tar`` holding
  ``{train,test}/<class>/NNNN.jpg`` (in-distribution);
- ``cifar100``: ``cifar100-jpeg.tar`` holding ``cifar100-jpeg/test/<fine label>/NNNN.jpg`` (near-OOD);
- ``tin``: ``tiny-imagenet-200-val.tar`` or a ``tiny-imagenet-200/`` folder (near-OOD);
- ``mnist``: ``mnist/t10k-images-idx3-ubyte.gz`` + ``mnist/t10k-labels-idx1-ubyte.gz``, or the
  same without ``.gz`` (far-OOD);
- ``svhn``: ``svhn/test_32x32.mat`` or ``test_32x32.mat`` (far-OOD);
- ``cifar10_pickle_train`` / ``cifar10_pickle_test``: ``cifar-10-batches-py/``;
- ``cifar100_pickle_test``: ``cifar-100-python/``.

The first six are what ``shared/data`` holds (see its README: the CIFAR sets there are JPEG
quality 75); the pickles and SVHN are for users who have the original files. Every set comes out
as an :class:`~covguard.data.images.ImageSet` of (N, 3, 32, 32) uint8, resized as OpenOOD v1.5
does (:mod:`covguard.data.images`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from covguard.data.archives import load_image_tar
from covguard.data.cache import cached
from covguard.data.cifar import (
    CIFAR10_CLASSES,
    load_cifar10_pickle,
    load_cifar100_pickle,
)
from covguard.data.idx import load_mnist
from covguard.data.images import ImageSet, check_limit, check_size, jpeg_matched
from covguard.data.svhn import load_svhn
from covguard.data.tiny_imagenet import load_tiny_imagenet_val

__all__ = ["SETS", "SetSpec", "data_root", "jpeg_matched", "load_set"]

# loader(paths, size=, limit=, progress=, name=) -> ImageSet; ``paths`` as listed in the layout
Loader = Callable[..., ImageSet]


@dataclass(frozen=True)
class SetSpec:
    """Where a named set lives under the data root and how to read it."""

    layouts: tuple[tuple[str, ...], ...]  # alternatives, each the relative paths that must all exist
    load: Loader  # reads the paths of the first layout found
    description: str  # one line for error messages and listings


def _cifar10_tar(split: str) -> Loader:
    def load(paths, *, size, limit, progress, name):
        return load_image_tar(
            paths[0],
            prefix=split,
            classes=CIFAR10_CLASSES,
            size=size,
            limit=limit,
            progress=progress,
            name=name,
        )

    return load


def _cifar100_tar(paths, *, size, limit, progress, name):
    data = load_image_tar(
        paths[0], prefix="cifar100-jpeg/test", size=size, limit=limit, progress=progress, name=name
    )
    if len(data.classes) != 100:
        raise ValueError(f"{paths[0]}: expected 100 CIFAR-100 class folders; found {len(data.classes)}")
    return data


def _tin(paths, *, size, limit, progress, name):
    return load_tiny_imagenet_val(paths[0], size=size, limit=limit, progress=progress, name=name)


def _mnist(paths, *, size, limit, progress, name):
    return load_mnist(paths[0], paths[1], size=size, limit=limit, name=name)


def _svhn(paths, *, size, limit, progress, name):
    return load_svhn(paths[0], size=size, limit=limit, name=name)


def _cifar10_pickle(split: str) -> Loader:
    def load(paths, *, size, limit, progress, name):
        return load_cifar10_pickle(paths[0], split, size=size, limit=limit, name=name)

    return load


def _cifar100_pickle(paths, *, size, limit, progress, name):
    return load_cifar100_pickle(paths[0], "test", size=size, limit=limit, name=name)


_MNIST = "mnist/t10k-images-idx3-ubyte", "mnist/t10k-labels-idx1-ubyte"

SETS: dict[str, SetSpec] = {
    "cifar10_train": SetSpec(
        (("cifar10-jpeg/train.tar",),), _cifar10_tar("train"), "CIFAR-10 train, JPEG q75"
    ),
    "cifar10_test": SetSpec((("cifar10-jpeg/test.tar",),), _cifar10_tar("test"), "CIFAR-10 test, JPEG q75"),
    "cifar100": SetSpec((("cifar100-jpeg.tar",),), _cifar100_tar, "CIFAR-100, 10k images, JPEG q75"),
    "tin": SetSpec(
        (("tiny-imagenet-200-val.tar",), ("tiny-imagenet-200",)), _tin, "Tiny ImageNet val, 64x64 -> 32x32"
    ),
    "mnist": SetSpec(
        (tuple(f"{p}.gz" for p in _MNIST), _MNIST), _mnist, "MNIST test, 28x28 gray -> 32x32 RGB"
    ),
    "svhn": SetSpec((("svhn/test_32x32.mat",), ("test_32x32.mat",)), _svhn, "SVHN test (cropped digits)"),
    "cifar10_pickle_train": SetSpec((("cifar-10-batches-py",),), _cifar10_pickle("train"), "CIFAR-10 train"),
    "cifar10_pickle_test": SetSpec((("cifar-10-batches-py",),), _cifar10_pickle("test"), "CIFAR-10 test"),
    "cifar100_pickle_test": SetSpec((("cifar-100-python",),), _cifar100_pickle, "CIFAR-100 test"),
}


def data_root() -> Path | None:
    """Folder holding the benchmark data: ``$COVGUARD_DATA``, else ``shared/data`` beside the checkout.

    The second is ``<checkout>/../shared/data`` for a source checkout at ``<checkout>`` (this
    file is ``<checkout>/src/covguard/data/registry.py``). Returns None when neither exists; a
    ``$COVGUARD_DATA`` that is not a folder gives a warning and None.
    """
    env = os.environ.get("COVGUARD_DATA")
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path
        warnings.warn(f"COVGUARD_DATA={env!r} is not a folder; no data root", stacklevel=2)
        return None
    shared = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return shared if shared.is_dir() else None


def _resolve(name: str, root: Path) -> tuple[Path, ...]:
    spec = SETS[name]
    for layout in spec.layouts:
        paths = tuple(root / rel for rel in layout)
        if all(p.exists() for p in paths):
            return paths
    expected = " or ".join(" + ".join(repr(str(root / rel)) for rel in layout) for layout in spec.layouts)
    raise FileNotFoundError(f"data set {name!r} ({spec.description}) not found: expected {expected}")


def load_set(
    name: str,
    root: str | Path,
    *,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    progress: bool = True,
    limit: int | None = None,
    size: int = 32,
) -> ImageSet:
    """Load a named benchmark set from ``root``, decoding it once and reading the cache after.

    Parameters
    ----------
    name : str
        One of ``SETS``: ``"cifar10_train"``, ``"cifar10_test"``, ``"cifar100"``, ``"tin"``,
        ``"mnist"``, ``"svhn"``, ``"cifar10_pickle_train"``, ``"cifar10_pickle_test"``,
        ``"cifar100_pickle_test"``.
    root : str or Path
        Data root (e.g. :func:`data_root`), under which the set's expected paths are looked up.
    cache_dir : str or Path, optional
        Cache folder for decoded sets; default ``$COVGUARD_CACHE`` or ``~/.cache/covguard``.
    cache : bool, default=True
        Read and write the cache; False always decodes.
    progress : bool, default=True
        Show a tqdm bar while decoding.
    limit : int, optional
        Only the first ``limit`` images (in the set's order: sorted paths for the JPEG tars,
        ``val_<i>`` order for Tiny ImageNet, file order for MNIST/SVHN/pickles). Class lists and
        label indices do not depend on ``limit``.
    size : int, default=32
        Output side.

    Returns
    -------
    ImageSet
        ``images`` (N, 3, size, size) uint8; ``.float()`` gives [0, 1] floats.

    Raises
    ------
    ValueError
        For an unknown ``name`` or a bad ``limit``/``size``.
    FileNotFoundError
        If the set's files are not under ``root``; the message lists the expected paths.

    Examples
    --------
    >>> root = data_root()                                   # doctest: +SKIP
    >>> test = load_set("cifar10_test", root)                # doctest: +SKIP
    >>> test.images.shape, test.classes[0]                   # doctest: +SKIP
    (torch.Size([10000, 3, 32, 32]), 'airplane')
    >>> x = test.float()                 # (10000, 3, 32, 32) float32 in [0, 1]  # doctest: +SKIP
    """
    if name not in SETS:
        raise ValueError(f"name must be one of {sorted(SETS)}; got {name!r}")
    check_limit(limit)
    check_size(size)
    if root is None:
        raise ValueError("root must be a folder (see data_root()); got None")
    root = Path(root)
    paths = _resolve(name, root)

    def build() -> ImageSet:
        return SETS[name].load(paths, size=size, limit=limit, progress=progress, name=name)

    if not cache:
        return build()
    return cached(
        build, sources=paths, params={"name": name, "size": size, "limit": limit}, cache_dir=cache_dir
    )
