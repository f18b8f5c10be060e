"""Data for covguard's demos and benchmarks.

Embedded (no files needed): scikit-learn's digits and synthetic out-of-distribution sets.
Real data (CIFAR-10 benchmarks, OpenOOD v1.5 protocol): loaders returning an :class:`ImageSet`
of (N, 3, 32, 32) uint8 images, and :func:`load_set` for the benchmark's named sets under a data
root (:func:`data_root`), decoded once and cached.
"""

from covguard.data.archives import load_image_folder, load_image_tar
from covguard.data.cache import cached, default_cache_dir
from covguard.data.cifar import (
    CIFAR10_CLASSES,
    load_cifar10_pickle,
    load_cifar100_pickle,
)
from covguard.data.digits import DigitsSplit, load_digits_split
from covguard.data.idx import load_mnist, read_idx
from covguard.data.images import ImageSet, jpeg_matched
from covguard.data.imglist import load_imglist, read_imglist
from covguard.data.registry import SETS, data_root, load_set
from covguard.data.svhn import load_svhn
from covguard.data.synthetic import (
    blank_frames,
    gaussian_noise,
    inverted,
    ood_sets,
    photo_crops,
    uniform_noise,
)
from covguard.data.tiny_imagenet import load_tiny_imagenet_val

__all__ = [
    "CIFAR10_CLASSES",
    "SETS",
    "DigitsSplit",
    "ImageSet",
    "blank_frames",
    "cached",
    "data_root",
    "default_cache_dir",
    "gaussian_noise",
    "inverted",
    "jpeg_matched",
    "load_cifar10_pickle",
    "load_cifar100_pickle",
    "load_digits_split",
    "load_image_folder",
    "load_image_tar",
    "load_imglist",
    "load_mnist",
    "load_set",
    "load_svhn",
    "load_tiny_imagenet_val",
    "ood_sets",
    "photo_crops",
    "read_idx",
    "read_imglist",
    "uniform_noise",
]
