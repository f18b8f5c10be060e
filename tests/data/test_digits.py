"""Embedded data: the digits split (data/digits.py) and the OOD sets (data/synthetic.py)."""

import socket
import urllib.request

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from covguard.data import (
    gaussian_noise,
    inverted,
    load_digits_split,
    ood_sets,
    photo_crops,
    uniform_noise,
)

N_DIGITS = 1797


@pytest.fixture(scope="module")
def split():
    return load_digits_split(size=16, seed=0)


def _rows(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) images and (N,) labels as rows [pixels..., label], sorted lexicographically."""
    table = np.concatenate([x.flatten(1).double().numpy(), y[:, None].double().numpy()], axis=1)
    return table[np.lexsort(table.T[::-1])]


# --- digits -------------------------------------------------------------------------------------


def test_split_sizes_add_up_to_all_digits(split):
    sizes = [len(split.train), len(split.val), len(split.test)]
    assert sum(sizes) == N_DIGITS
    assert sizes == [1077, 360, 360]  # 60 / 20 / 20 % of 1797, as rounded by train_test_split


def test_split_shapes_dtypes_range(split):
    for dataset in (split.train, split.val, split.test):
        x, y = dataset.tensors
        assert x.shape == (len(dataset), 1, 16, 16) and x.dtype == torch.float32
        assert y.shape == (len(dataset),) and y.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1
        assert x.max() > 0.9  # ink reaches (close to) 1: scaled by 16, not by 255
    assert split.classes == tuple(str(k) for k in range(10))


def test_split_is_stratified(split):
    counts_all = np.bincount(load_digits().target, minlength=10)
    for dataset, fraction in ((split.train, 0.6), (split.val, 0.2), (split.test, 0.2)):
        counts = np.bincount(dataset.tensors[1].numpy(), minlength=10)
        assert (counts > 0).all()
        np.testing.assert_allclose(counts, fraction * counts_all, atol=1.5)


def test_split_at_native_size_partitions_sklearn_digits():
    # independent reference: scikit-learn's arrays scaled by hand; the three sets together must
    # hold exactly the 1797 (image, label) pairs, each once
    split = load_digits_split(size=8, seed=0)
    bunch = load_digits()
    reference = _rows(torch.from_numpy(bunch.images / 16.0), torch.from_numpy(bunch.target))
    # k / 16 is exact in float32, so the comparison can be exact
    x = torch.cat([d.tensors[0] for d in (split.train, split.val, split.test)])
    y = torch.cat([d.tensors[1] for d in (split.train, split.val, split.test)])
    np.testing.assert_array_equal(_rows(x, y), reference)


def test_upsampling_keeps_the_image_content():
    # bilinear x2 upsampling then 2x2 average pooling gives back the 8x8 image up to blur
    x8 = load_digits_split(size=8, seed=0).test.tensors[0]
    x16 = load_digits_split(size=16, seed=0).test.tensors[0]
    pooled = torch.nn.functional.avg_pool2d(x16, 2)  # (N, 1, 8, 8)
    assert (pooled - x8).abs().mean() < 0.1
    assert load_digits_split(size=28, seed=0).test.tensors[0].shape[1:] == (1, 28, 28)


def test_split_deterministic_for_seed(split):
    again = load_digits_split(size=16, seed=0)
    other = load_digits_split(size=16, seed=1)
    for a, b, c in zip(split.test.tensors, again.test.tensors, other.test.tensors):
        assert torch.equal(a, b)
    assert not torch.equal(split.test.tensors[1], other.test.tensors[1])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"size": 7}, "size"),
        ({"size": 16.0}, "size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
    ],
)
def test_split_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument} must"):
        load_digits_split(**kwargs)


# --- synthetic OOD sets -------------------------------------------------------------------------

GENERATORS = {
    "uniform_noise": uniform_noise,
    "gaussian_noise": gaussian_noise,
    "photo_crops": photo_crops,
}


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_shape_range_determinism(name):
    generate = GENERATORS[name]
    x = generate(20, size=12, seed=3)
    assert x.shape == (20, 1, 12, 12) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, generate(20, size=12, seed=3))
    assert not torch.equal(x, generate(20, size=12, seed=4))


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_generator_rejects_bad_count(name, n):
    with pytest.raises(ValueError, match="^n must"):
        GENERATORS[name](n)


def test_noise_moments_and_channels():
    u = uniform_noise(200, size=16, channels=3, seed=0)
    assert u.shape == (200, 3, 16, 16)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    g = gaussian_noise(200, size=16, channels=3, seed=0, mean=0.5, std=0.25)
    assert g.shape == (200, 3, 16, 16)
    assert abs(g.mean().item() - 0.5) < 0.005
    # clipping at 0 and 1 is two standard deviations out: P(|z| > 2) = 4.55 %
    clipped = ((g == 0) | (g == 1)).double().mean().item()
    assert abs(clipped - 0.0455) < 0.005
    with pytest.raises(ValueError, match="^std must"):
        gaussian_noise(2, std=0.0)
    with pytest.raises(ValueError, match="^channels must"):
        uniform_noise(2, channels=0)


def test_inverted_is_an_involution(split):
    x = split.test.tensors[0]
    once = inverted(x)
    assert torch.allclose(once, 1 - x)
    torch.testing.assert_close(inverted(once), x, rtol=0, atol=1e-7)
    assert once.mean() > 0.5 > x.mean()  # dark background turned bright
    with pytest.raises(ValueError, match="^images must have range"):
        inverted(x * 2)
    with pytest.raises(ValueError, match="^images must be"):
        inverted(torch.zeros(2, 16, 16))


def test_photo_crops_are_stretched_and_unlike_digits(split):
    x = photo_crops(300, size=16, seed=0)
    assert torch.equal(x.amin(dim=(1, 2, 3)), torch.zeros(300))
    assert torch.equal(x.amax(dim=(1, 2, 3)), torch.ones(300))
    digits = split.test.tensors[0]
    photo_means, digit_means = x.mean(dim=(1, 2, 3)), digits.mean(dim=(1, 2, 3))
    # same range, different content: photos are brighter on average and vary far more
    assert photo_means.mean() > digit_means.mean() + 0.1
    assert photo_means.std() > 2 * digit_means.std()
    # a third of a digit is black background, few photo pixels are that dark
    assert (x < 0.05).float().mean() < 0.5 * (digits < 0.05).float().mean()


def test_photo_crops_work_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert photo_crops(4, size=16, seed=0).shape == (4, 1, 16, 16)


def test_ood_sets(split):
    x_test = split.test.tensors[0]
    sets = ood_sets(x_test, seed=0)
    assert list(sets) == ["photo_crops", "uniform_noise", "gaussian_noise", "inverted_digits"]
    for x in sets.values():
        assert x.shape == x_test.shape and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    # with n = N the inverted set is every test image inverted, in some order
    zeros = torch.zeros(len(x_test), dtype=torch.int64)
    np.testing.assert_allclose(
        _rows(sets["inverted_digits"], zeros), _rows(1 - x_test, zeros), atol=1e-7
    )
    # the noise sets do not share a stream
    assert not torch.equal(sets["uniform_noise"], uniform_noise(len(x_test), seed=0))
    again = ood_sets(x_test, seed=0)
    assert all(torch.equal(sets[name], again[name]) for name in sets)
    small = ood_sets(x_test, n=10, seed=1)
    assert all(x.shape == (10, 1, 16, 16) for x in small.values())
    assert not torch.equal(small["photo_crops"], sets["photo_crops"][:10])


@pytest.mark.parametrize(
    ("x_test", "n", "argument"),
    [
        (torch.rand(5, 3, 16, 16), None, "x_test"),
        (torch.rand(5, 1, 16, 12), None, "x_test"),
        (torch.rand(0, 1, 16, 16), None, "x_test"),
        (torch.rand(5, 1, 16, 16), 6, "n"),
        (torch.rand(5, 1, 16, 16), 0, "n"),
    ],
)
def test_ood_sets_rejects_bad_arguments(x_test, n, argument):
    with pytest.raises(ValueError, match=f"^{argument} must"):
        ood_sets(x_test, n=n)
