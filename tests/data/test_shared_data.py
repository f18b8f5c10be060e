"""The real benchmark data in ../shared/data (skipped when absent). Decoded into a temporary cache."""

import time

import pytest
import torch

import covguard.data.images as images_mod
from covguard.data import CIFAR10_CLASSES, data_root, jpeg_matched, load_set
from covguard.data.registry import SETS

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("covguard-cache")


def _root_for(name):
    root = data_root()
    if root is None:
        pytest.skip("no data root: set COVGUARD_DATA or provide ../shared/data")
    layouts = SETS[name].layouts
    if not any(all((root / rel).exists() for rel in layout) for layout in layouts):
        pytest.skip(f"{name}: none of {layouts} under {root}")
    return root


def test_cifar10_test_full_and_cached(cache_dir, monkeypatch):
    root = _root_for("cifar10_test")
    start = time.perf_counter()
    data = load_set("cifar10_test", root, cache_dir=cache_dir, progress=False)
    first = time.perf_counter() - start
    assert data.images.shape == (10000, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.classes == CIFAR10_CLASSES
    assert torch.bincount(data.labels, minlength=10).tolist() == [1000] * 10
    mean = data.float().mean().item()
    assert 0.3 < mean < 0.65, mean  # natural images, not blank or saturated

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(images_mod, "decode_image", fail)
    start = time.perf_counter()
    again = load_set("cifar10_test", root, cache_dir=cache_dir, progress=False)
    second = time.perf_counter() - start
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    assert second < first, (first, second)


def test_cifar100_first_images(cache_dir):
    root = _root_for("cifar100")
    data = load_set("cifar100", root, cache_dir=cache_dir, limit=300, progress=False)
    assert data.images.shape == (300, 3, 32, 32)
    assert len(data.classes) == 100 and data.classes[:2] == ("apple", "aquarium_fish")
    assert data.labels.tolist() == [0] * 100 + [1] * 100 + [2] * 100  # sorted paths, 100 per class


def test_tiny_imagenet_first_images(cache_dir):
    root = _root_for("tin")
    data = load_set("tin", root, cache_dir=cache_dir, limit=300, progress=False)
    assert data.images.shape == (300, 3, 32, 32) and len(data.classes) == 200
    # val_annotations.txt: val_0 n03444034, val_1 n04067472, val_2 n04070727
    assert [data.classes[k] for k in data.labels[:3].tolist()] == ["n03444034", "n04067472", "n04070727"]


def test_mnist_first_images_and_jpeg_matched(cache_dir):
    root = _root_for("mnist")
    data = load_set("mnist", root, cache_dir=cache_dir, limit=300, progress=False)
    assert data.images.shape == (300, 3, 32, 32)
    assert data.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the MNIST test set's first digits
    assert torch.equal(data.images[:, 0], data.images[:, 1]) and torch.equal(
        data.images[:, 0], data.images[:, 2]
    )
    matched = jpeg_matched(data.images[:20])
    assert matched.shape == (20, 3, 32, 32)
    diff = (matched.float() - data.images[:20].float()).abs().mean().item()
    assert 0.0 < diff < 20.0, diff  # compressed, still the same digits


def test_cifar10_train_limit_keeps_all_classes(cache_dir):
    root = _root_for("cifar10_train")
    data = load_set("cifar10_train", root, cache_dir=cache_dir, limit=200, progress=False)
    assert data.images.shape == (200, 3, 32, 32) and data.classes == CIFAR10_CLASSES
    assert data.labels.tolist() == [0] * 200  # first 200 sorted paths are train/airplane/
