"""SVHN cropped digits (``test_32x32.mat``, format 2 of http://ufldl.stanford.edu/housenumbers/).

The MATLAB file holds ``X`` of shape (32, 32, 3, N) uint8 and ``y`` of shape (N, 1) with labels
1..10, where 10 stands for the digit 0; here ``10 -> 0`` so that label = digit. Read with
``scipy.io.loadmat`` (a MATLAB v5 file, no pickle involved).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from covguard.data.idx import MNIST_CLASSES
from covguard.data.images import ImageSet, check_limit, check_size, images_from_arrays

__all__ = ["load_svhn"]


def load_svhn(path: str | Path, *, size: int = 32, limit: int | None = None, name: str = "svhn") -> ImageSet:
    """Load an SVHN ``*_32x32.mat`` file.

    Parameters
    ----------
    path : str or Path
        ``test_32x32.mat`` (or train/extra).
    size : int, default=32
        Output side (32 keeps the pixels exact).
    limit : int, optional
        Keep only the first ``limit`` images.

    Returns
    -------
    ImageSet
        ``images`` (N, 3, size, size) uint8, ``labels`` 0..9 (digit value), ``classes`` "0".."9".
    """
    from scipy.io import (
        loadmat,  # scipy comes with scikit-learn; imported only when needed
    )

    check_size(size)
    check_limit(limit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SVHN .mat file not found: {str(path)!r}")
    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except (ValueError, OSError, TypeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable MATLAB file: {err}") from err
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{str(path)!r} must hold variables 'X' and 'y'; found {found}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise ValueError(f"{str(path)!r}: 'X' must be uint8 of shape (H, W, 3, N); got {x.shape} {x.dtype}")
    if len(y) != x.shape[3] or (len(y) and (y.min() < 1 or y.max() > 10)):
        raise ValueError(f"{str(path)!r}: 'y' must hold {x.shape[3]} labels in 1..10; got {y.shape}")
    x = np.ascontiguousarray(x.transpose(3, 0, 1, 2))[:limit]  # (H, W, 3, N) -> (N, H, W, 3)
    y = (y.astype(np.int64) % 10)[:limit]  # label 10 is the digit 0
    if len(x) == 0:
        raise ValueError(f"{str(path)!r} holds no images")
    return ImageSet(
        images=images_from_arrays(x, size=size, name=name),
        labels=torch.from_numpy(y),
        classes=MNIST_CLASSES,
        name=name,
        source=str(path),
    )
