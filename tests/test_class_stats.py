"""Reduced class statistics against exact per-class covariances (numpy) projected on the basis."""

import numpy as np
import pytest
import torch

from covguard.class_stats import SharedBasisClassMoments, reduced_quadratic_form
from covguard.covariance import CovarianceConfig, quadratic_form
from covguard.stats import Moments


def class_data(n=600, d=10, k=3, seed=0, offset=0.0):
    """Vectors with a class-specific mean and covariance, (n, d), labels (n,)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    mix = rng.normal(size=(k, d, d)) * np.linspace(2.0, 0.2, d)  # decaying spectrum
    x = np.einsum("nd,nde->ne", rng.normal(size=(n, d)), mix[y]) + 3.0 * rng.normal(size=(k, d))[y] + offset
    return x, y


def two_passes(x, w, rank, batch, reduce_dtype=torch.float64):
    acc = SharedBasisClassMoments(x.shape[1], w.shape[1], rank=rank, reduce_dtype=reduce_dtype)
    xs, ws = torch.from_numpy(x), torch.from_numpy(w)
    for s in range(0, len(x), batch):
        acc.update_pooled(xs[s : s + batch], ws[s : s + batch])
    acc.fit_basis()
    for s in range(0, len(x), batch):
        acc.update(xs[s : s + batch], ws[s : s + batch])
    return acc.result()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("batch", [37, 600])
def test_moments_equal_exact_class_covariance_projected_on_basis(soft, batch):
    x, y = class_data()
    w = np.random.default_rng(1).dirichlet(np.ones(3), size=len(x)) if soft else np.eye(3)[y]
    stats = two_passes(x, w, rank=4, batch=batch)
    U = stats.basis.numpy()  # (D, r)
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-10)
    for k in range(3):
        mean = np.average(x, axis=0, weights=w[:, k])
        cov = np.cov(x, rowvar=False, aweights=w[:, k], bias=True)  # exact (D, D)
        assert rel_err(stats.n[k], w[:, k].sum()) < 1e-12
        assert rel_err(stats.mean[k], mean) < 1e-12
        assert rel_err(stats.covariance_in_basis()[k], U.T @ cov @ U) < 1e-10
        assert rel_err(stats.trace[k] / stats.n[k], np.trace(cov)) < 1e-10
        resid = (np.trace(cov) - np.trace(U.T @ cov @ U)) / (x.shape[1] - 4)
        assert rel_err(stats.residual_variance()[k], resid) < 1e-10


def test_basis_is_top_eigenvectors_of_pooled_within_class_covariance():
    x, y = class_data(seed=2)
    stats = two_passes(x, np.eye(3)[y], rank=3, batch=100)
    within = sum(np.cov(x[y == k], rowvar=False, bias=True) * (y == k).sum() for k in range(3)) / len(x)
    vecs = np.linalg.eigh(within)[1][:, -3:]
    U = stats.basis.numpy()
    np.testing.assert_allclose(U @ U.T, vecs @ vecs.T, atol=1e-8)


def test_full_basis_reproduces_exact_lowrank_form():
    """With r = D the reduced form is the probabilistic-PCA form of each exact class covariance."""
    x, y = class_data(d=8, seed=3)
    w = np.eye(3)[y]
    stats = two_passes(x, w, rank=8, batch=128)
    config = CovarianceConfig(form="lowrank", rank=3, eps=0.01)
    got = reduced_quadratic_form(stats, config).distance_sq(torch.from_numpy(x))  # (n, K)
    xs = torch.from_numpy(x)
    means = torch.stack([xs[y == k].mean(0) for k in range(3)])
    scatters = torch.stack([(xs[y == k] - means[k]).T @ (xs[y == k] - means[k]) for k in range(3)])
    exact = Moments(torch.from_numpy(w.sum(0)), means, scatters)
    ref = quadratic_form(exact, config).distance_sq(xs)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)


def test_float32_reduction_with_large_mean_stays_accurate():
    x, y = class_data(seed=4, offset=1e3)
    w = np.eye(3)[y]
    ref = two_passes(x, w, rank=4, batch=200)
    got = two_passes(x.astype(np.float32), w.astype(np.float32), rank=4, batch=200, reduce_dtype=torch.float32)
    assert rel_err(got.mean, ref.mean) < 1e-6
    # The bases agree up to sign; compare the statistics through the projector-invariant quantities.
    U, V = got.basis.numpy(), ref.basis.numpy()
    np.testing.assert_allclose(U @ U.T, V @ V.T, atol=1e-4)
    assert rel_err(got.trace, ref.trace) < 1e-5
    assert rel_err(torch.diagonal(got.scatter, dim1=-2, dim2=-1).sum(-1), torch.diagonal(ref.scatter, dim1=-2, dim2=-1).sum(-1)) < 1e-4


def test_memory_does_not_hold_per_class_full_scatters():
    D, K, r = 64, 20, 8
    acc = SharedBasisClassMoments(D, K, rank=r)
    x = torch.randn(500, D)
    w = torch.nn.functional.one_hot(torch.arange(500) % K, K).float()
    acc.update_pooled(x, w).fit_basis()
    stats = acc.update(x, w).result()
    held = sum(t.numel() for t in (acc.n, acc.mean, acc.trace, acc.within, acc.basis, stats.scatter))
    assert held <= D * D + K * (D + r * r) + D * r + 2 * K + K * r
    assert held < K * D * D / 4


def test_misuse_raises_clear_errors():
    acc = SharedBasisClassMoments(4, 2, rank=2)
    x, w = torch.randn(10, 4), torch.ones(10, 2)
    with pytest.raises(ValueError, match=r"x must be \(M, D\) with D=4"):
        acc.update_pooled(torch.randn(10, 3), w)
    with pytest.raises(ValueError, match=r"weights must be \(M, K\)"):
        acc.update_pooled(x, torch.ones(10, 3))
    with pytest.raises(RuntimeError, match="call fit_basis"):
        acc.update(x, w)
    with pytest.raises(RuntimeError, match="call update_pooled"):
        acc.fit_basis()
    acc.update_pooled(x, w).fit_basis()
    with pytest.raises(RuntimeError, match="first pass"):
        acc.update_pooled(x, w)
    with pytest.raises(ValueError, match="reduced class statistics support"):
        reduced_quadratic_form(acc.update(x, w).result(), CovarianceConfig(form="full"))


def test_empty_class_is_reported_and_can_take_pooled_statistics():
    x, y = class_data(seed=5)
    w = np.eye(4)[y]  # class 3 never occurs
    stats = two_passes(x, w, rank=4, batch=150)
    assert stats.empty_classes() == [3]
    with pytest.raises(ValueError, match=r"classes \[3\] have no samples"):
        reduced_quadratic_form(stats, CovarianceConfig(form="lowrank", rank=2))
    filled = stats.with_pooled([3])
    assert filled.empty_classes() == [] and filled.n[3] == len(x)
    np.testing.assert_allclose(filled.mean[3].numpy(), x.mean(0), rtol=1e-10)
    within = sum(np.cov(x[y == k], rowvar=False, bias=True) * (y == k).sum() for k in range(3)) / len(x)
    U = stats.basis.numpy()
    np.testing.assert_allclose(filled.covariance_in_basis()[3].numpy(), U.T @ within @ U, rtol=1e-9, atol=1e-12)
    form = reduced_quadratic_form(filled, CovarianceConfig(form="lowrank", rank=2))
    assert torch.isfinite(form.distance_sq(torch.from_numpy(x))).all()


# ---- ClassMahalanobis(basis_rank=..., fit_positions=1.0) --------------------------------------------------------


def _loader(x, y, batch_size):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def test_full_basis_equals_exact_lowrank_class_detector(tiny_model, images):
    """With the basis spanning every dimension the reduced statistics are exact."""
    import covguard as cg
    from tests.conftest import make_images

    x, y = images
    fit, hold = _loader(x[:200], y[:200], 50), [x[200:]]
    exact = cg.ClassMahalanobis(tiny_model, layers=["block1", "block2"], covariance="lowrank", rank=6, fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    dims = {layer: form.mean.shape[1] for layer, form in exact.forms_.items()}
    reduced = cg.ClassMahalanobis(
        tiny_model, layers=["block1", "block2"], covariance="lowrank", rank=6, basis_rank=max(dims.values()), fit_positions=1.0
    ).fit(fit, holdout=hold, progress=False)
    test, _ = make_images(12, seed=5)
    torch.testing.assert_close(reduced.score(test), exact.score(test), rtol=1e-3, atol=1e-3)


def test_small_basis_scores_close_and_fit_detectors_matches_fit(tiny_model, images, tmp_path):
    import covguard as cg
    from covguard.detectors.multi import fit_detectors

    x, y = images
    fit, hold = _loader(x[:200], y[:200], 50), [x[200:]]
    kwargs = {"layers": ["block2"], "covariance": "lowrank", "rank": 4, "basis_rank": 16, "fit_positions": 1.0}
    alone = cg.ClassMahalanobis(tiny_model, **kwargs).fit(fit, holdout=hold, progress=False)
    together = cg.ClassMahalanobis(tiny_model, **kwargs)
    simple = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0)
    fit_detectors([simple, together], fit, holdout=hold, progress=False)
    torch.testing.assert_close(together.score(x[:10]), alone.score(x[:10]))
    loaded = cg.load(cg.save(alone, tmp_path / "reduced.safetensors"), tiny_model)
    assert loaded.basis_rank == 16
    torch.testing.assert_close(loaded.score(x[:10]), alone.score(x[:10]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"covariance": "full", "basis_rank": 8}, "basis_rank needs covariance='lowrank'"),
        ({"covariance": "lowrank", "rank": 16, "basis_rank": 8}, "rank <= basis_rank"),
        ({"covariance": "lowrank", "rank": 4, "basis_rank": 0}, "basis_rank must be a positive integer"),
        ({"covariance": "lowrank", "rank": 4, "basis_rank": 8, "keep_moments": True}, "keep_moments"),
    ],
)
def test_bad_basis_rank_settings_raise(tiny_model, kwargs, match):
    import covguard as cg

    with pytest.raises(ValueError, match=match):
        cg.ClassMahalanobis(tiny_model, layers=["block2"], **kwargs)


def test_basis_rank_needs_a_reiterable_loader(tiny_model, images):
    import covguard as cg

    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=["block2"], covariance="lowrank", rank=4, basis_rank=8, fit_positions=1.0)
    with pytest.raises(TypeError, match="re-iterable"):
        det.fit(iter(_loader(x, y, 60)), progress=False)
