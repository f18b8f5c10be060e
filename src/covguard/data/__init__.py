"""Data that ships with covguard's dependencies: digits and synthetic out-of-distribution sets."""

from covguard.data.digits import DigitsSplit, load_digits_split
from covguard.data.synthetic import (
    gaussian_noise,
    inverted,
    ood_sets,
    photo_crops,
    uniform_noise,
)

__all__ = [
    "DigitsSplit",
    "gaussian_noise",
    "inverted",
    "load_digits_split",
    "ood_sets",
    "photo_crops",
    "uniform_noise",
]
