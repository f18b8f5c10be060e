"""Streaming moments against numpy float64 on explicitly unfolded patches."""

import numpy as np
import pytest
import torch

from covguard import stats
from covguard.stats import StreamingMoments, batch_moments, merge_moments


@pytest.fixture(autouse=True, params=["merge every batch", "hold batches back"])
def pending_bytes(request, monkeypatch):
    """Run every test with batches merged one by one and with batches reduced in chunks."""
    if request.param == "merge every batch":
        monkeypatch.setattr(stats, "_PENDING_BYTES", 1)
    return request.param


def unfold_np(feats: np.ndarray, k: int = 3) -> np.ndarray:
    """Independent patch extraction with numpy loops: (N, C, H, W) -> (N*L, C*k*k), channel-major."""
    N, C, H, W = feats.shape
    rows = []
    for n in range(N):
        for i in range(H - k + 1):
            for j in range(W - k + 1):
                rows.append(feats[n, :, i : i + k, j : j + k].reshape(-1))
    return np.asarray(rows)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def stream_patches(feats: torch.Tensor, batch_size: int, reduce_dtype: torch.dtype = torch.float64) -> StreamingMoments:
    from covguard.patches import patch_vectors

    acc = StreamingMoments(feats.shape[1] * 9, reduce_dtype=reduce_dtype)
    for start in range(0, feats.shape[0], batch_size):
        p = patch_vectors(feats[start : start + batch_size])  # (n, L, D)
        acc.update(p.reshape(-1, p.shape[-1]))
    return acc


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("batch_size", [1, 7, 23])
@pytest.mark.parametrize("reduce_dtype", [torch.float64, torch.float32])
def test_patch_covariance_matches_numpy(offset, batch_size, reduce_dtype):
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(4, 4))
    feats = np.einsum("nchw,cd->ndhw", rng.normal(size=(23, 4, 6, 5)), mix) + offset
    feats = feats.astype(np.float32)  # activations arrive as float32
    acc = stream_patches(torch.from_numpy(feats), batch_size, reduce_dtype)
    ref = unfold_np(feats.astype(np.float64))
    m = acc.moments
    assert m.n.item() == ref.shape[0]
    # float32 reductions: centered in float32, the residual mean added back in float64.
    assert rel_err(m.mean[0], ref.mean(0)) < (1e-12 if reduce_dtype == torch.float64 else 1e-6)
    assert rel_err(m.covariance()[0], np.cov(ref, rowvar=False, bias=True)) < 1e-6


def test_merge_of_halves_equals_one_pass():
    x = torch.randn(500, 12, dtype=torch.float64) * 3 + 50
    whole = batch_moments(x)
    merged = merge_moments(batch_moments(x[:123]), batch_moments(x[123:]))
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.scatter, whole.scatter, rtol=1e-10, atol=1e-9)
    a, b = StreamingMoments(12).update(x[:300]), StreamingMoments(12).update(x[300:])
    torch.testing.assert_close(a.merge(b).moments.scatter, whole.scatter, rtol=1e-10, atol=1e-9)


def test_onehot_weights_reproduce_per_class_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)) + rng.integers(0, 3, size=(300, 1)) * 10
    y = rng.integers(0, 3, size=300)
    w = np.eye(3)[y]
    acc = StreamingMoments(5, n_groups=3)
    for s in range(0, 300, 41):
        acc.update(torch.from_numpy(x[s : s + 41]), torch.from_numpy(w[s : s + 41]))
    cov = acc.moments.covariance()
    for k in range(3):
        ref = x[y == k]
        assert acc.moments.n[k].item() == len(ref)
        assert rel_err(acc.moments.mean[k], ref.mean(0)) < 1e-12
        assert rel_err(cov[k], np.cov(ref, rowvar=False, bias=True)) < 1e-10


def test_soft_weights_match_weighted_numpy_covariance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 4))
    w = rng.dirichlet(np.ones(3), size=200)
    acc = StreamingMoments(4, n_groups=3)
    for s in range(0, 200, 33):
        acc.update(torch.from_numpy(x[s : s + 33]), torch.from_numpy(w[s : s + 33]))
    cov = acc.moments.covariance()
    for k in range(3):
        ref = np.cov(x, rowvar=False, aweights=w[:, k], bias=True)
        assert rel_err(cov[k], ref) < 1e-10
        assert rel_err(acc.moments.mean[k], np.average(x, axis=0, weights=w[:, k])) < 1e-12


def test_pooled_equals_single_group():
    x = torch.randn(90, 3, dtype=torch.float64)
    y = torch.arange(90) % 3
    grouped = batch_moments(x, torch.nn.functional.one_hot(y, 3).double())
    single = batch_moments(x)
    torch.testing.assert_close(grouped.pooled().scatter, single.scatter, rtol=1e-12, atol=1e-12)


def test_empty_class_is_a_clear_error_not_nan():
    acc = StreamingMoments(2, n_groups=3)
    acc.update(torch.randn(10, 2), torch.nn.functional.one_hot(torch.zeros(10, dtype=torch.long), 3).float())
    assert torch.isfinite(acc.moments.mean).all() and torch.isfinite(acc.moments.scatter).all()
    with pytest.raises(ValueError, match=r"groups \[1, 2\] have no samples"):
        acc.moments.covariance()


@pytest.mark.parametrize(
    "x, weights, match",
    [
        (torch.randn(4, 3), torch.ones(4, 2), r"x must be \(M, D\) with D=2"),
        (torch.tensor([[float("nan"), 0.0]]), torch.ones(1, 2), "NaN or inf"),
        (torch.randn(4, 2), torch.ones(3, 2), r"weights must be \(M, K\)"),
        (torch.randn(4, 2), -torch.ones(4, 2), "non-negative"),
        (torch.randn(4, 2), None, r"weights of shape \(M, 2\) are required"),
    ],
)
def test_update_rejects_bad_input(x, weights, match):
    with pytest.raises(ValueError, match=match):
        StreamingMoments(2, n_groups=2).update(x, weights)


def test_grouped_updates_never_write_into_moments_they_were_given():
    x, w = torch.randn(40, 3, dtype=torch.float64), torch.rand(40, 2, dtype=torch.float64)
    given = StreamingMoments(3, n_groups=2).update(x[:20], w[:20])
    acc = StreamingMoments(3, n_groups=2).merge(given)  # holds given's moments
    before = given.moments.scatter.clone()
    acc.update(x[20:], w[20:])
    assert torch.equal(given.moments.scatter, before)
    ref = StreamingMoments(3, n_groups=2).update(x, w).moments
    torch.testing.assert_close(acc.moments.scatter, ref.scatter, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.moments.mean, ref.mean, rtol=1e-12, atol=1e-12)


def test_held_back_batches_are_copies_and_reading_midstream_changes_nothing():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 4)) + 7
    w = np.eye(3)[rng.integers(0, 3, size=120)]
    acc = StreamingMoments(4, n_groups=3)
    for s in range(0, 120, 30):
        batch = torch.from_numpy(x[s : s + 30].copy())
        acc.update(batch, torch.from_numpy(w[s : s + 30]))
        batch.fill_(1e6)  # the caller reuses its buffer
        if s == 30:
            assert acc.moments.n.sum().item() == 60  # a read reduces what is held back
    cov = acc.moments.covariance()
    for k in range(3):
        ref = x[w[:, k] > 0]
        assert rel_err(cov[k], np.cov(ref, rowvar=False, bias=True)) < 1e-10


def test_moments_cannot_be_replaced_while_batches_are_held_back(pending_bytes):
    acc = StreamingMoments(2).update(torch.randn(5, 2))
    if pending_bytes == "hold batches back":
        with pytest.raises(ValueError, match="held back"):
            acc.moments = batch_moments(torch.randn(3, 2))
    assert acc.moments.n.item() == 5
    acc.moments = batch_moments(torch.ones(3, 2, dtype=torch.float64))  # after a read, allowed
    assert acc.moments.n.item() == 3
