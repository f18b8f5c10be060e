"""Embedded in-distribution data: scikit-learn's handwritten digits, no download needed.

scikit-learn ships the 1797 images of the UCI "Optical Recognition of Handwritten Digits" test
set (8x8 pixels, 16 grey levels, classes 0-9) inside the package, so covguard's demo and tests
run on a machine without network access or data directories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

__all__ = ["DigitsSplit", "load_digits_split"]

_NATIVE_SIZE = 8  # side of the images as stored in scikit-learn
_MAX_LEVEL = 16.0  # pixel values in scikit-learn's copy are integers 0..16


@dataclass(frozen=True)
class DigitsSplit:
    """Stratified train/validation/test split of the digits.

    Each data set holds ``(x, y)`` with ``x`` a float32 tensor of shape ``(N, 1, size, size)``
    in ``[0, 1]`` (0 = background, 1 = ink) and ``y`` an int64 tensor of shape ``(N,)`` with
    labels in ``0..9``.
    """

    train: TensorDataset  # fit the classifier and the detectors
    val: TensorDataset  # calibrate thresholds, standardize scores, early stopping
    test: TensorDataset  # held-out in-distribution data for the benchmarks
    classes: tuple[str, ...]  # class names, ``classes[k]`` is the name of label ``k``


def load_digits_split(
    *,
    size: int = 16,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> DigitsSplit:
    """Load scikit-learn's digits as image tensors split into train, validation and test sets.

    The 8x8 images are scaled from their integer levels ``0..16`` to ``[0, 1]`` and upsampled to
    ``size x size`` by bilinear interpolation (``torch.nn.functional.interpolate`` with
    ``mode="bilinear", align_corners=False``). Bilinear weights are convex, so the values stay in
    ``[0, 1]``; ``size=8`` returns the native pixels unchanged. Upsampling gives the feature maps
    of a small CNN enough spatial extent for patch statistics (16x16 input, 8x8 and 4x4 maps
    after two poolings).

    The split is stratified by class and reproducible: the test set is drawn first, then the
    validation set from the rest, both with ``sklearn.model_selection.train_test_split`` and
    ``random_state=seed``.

    Parameters
    ----------
    size : int, default=16
        Side of the returned images in pixels, at least 8.
    seed : int, default=0
        Seed of the split.
    val_fraction : float, default=0.2
        Fraction of all 1797 images in the validation set, in ``(0, 1)``.
    test_fraction : float, default=0.2
        Fraction of all 1797 images in the test set, in ``(0, 1)``;
        ``val_fraction + test_fraction`` must be below 1.

    Returns
    -------
    DigitsSplit
        ``train``, ``val`` and ``test`` data sets of ``(x, y)`` pairs with ``x`` of shape
        ``(N, 1, size, size)``, float32 in ``[0, 1]``, and ``y`` of shape ``(N,)``, int64; and
        ``classes = ("0", ..., "9")``.

    Raises
    ------
    ValueError
        If ``size`` is not an integer of at least 8, or a fraction is outside ``(0, 1)``, or the
        two fractions add up to 1 or more.

    Examples
    --------
    >>> split = load_digits_split(size=16, seed=0)
    >>> x, y = split.train.tensors
    >>> tuple(x.shape[1:]), x.dtype, y.dtype
    ((1, 16, 16), torch.float32, torch.int64)
    >>> len(split.train) + len(split.val) + len(split.test)
    1797
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < _NATIVE_SIZE:
        raise ValueError(f"size must be an integer >= {_NATIVE_SIZE}; got {size!r}")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be in (0, 1); got {fraction!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must be < 1 to leave a training set; "
            f"got {val_fraction!r} + {test_fraction!r} = {val_fraction + test_fraction!r}"
        )

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).to(torch.float32).div_(_MAX_LEVEL)  # (N, 8, 8)
    x = x.unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0)  # guard against rounding just outside [0, 1]
    y = torch.from_numpy(bunch.target).to(torch.int64)  # (N,)

    rest, test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),  # a fraction of all images, not of `rest`
        random_state=seed,
        stratify=bunch.target[rest],
    )

    def subset(rows: np.ndarray) -> TensorDataset:
        rows_t = torch.from_numpy(rows)
        return TensorDataset(x[rows_t], y[rows_t])

    return DigitsSplit(
        train=subset(train),
        val=subset(val),
        test=subset(test),
        classes=tuple(str(name) for name in bunch.target_names),
    )
