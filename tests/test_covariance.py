"""Covariance forms against explicit numpy/scikit-learn computations."""

import numpy as np
import pytest
import torch
from sklearn.covariance import oas

from covguard.covariance import CovarianceConfig, oas_shrinkage, quadratic_form
from covguard.stats import batch_moments


def sample(n=400, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 5.0


def explicit_precision(x: np.ndarray, form: str, eps: float, rank: int) -> np.ndarray:
    """Reference precision matrices written from the formulas, in numpy."""
    D = x.shape[1]
    cov = np.cov(x, rowvar=False, bias=True)
    cov = cov + eps * np.trace(cov) / D * np.eye(D)
    if form == "full":
        return np.linalg.inv(cov)
    if form == "diag":
        return np.diag(1 / np.diag(cov))
    vals, vecs = np.linalg.eigh(cov)
    top_vals, top_vecs = vals[D - rank :], vecs[:, D - rank :]
    s2 = vals[: D - rank].mean()
    return top_vecs @ np.diag(1 / top_vals - 1 / s2) @ top_vecs.T + np.eye(D) / s2


@pytest.mark.parametrize("form, rank", [("full", 64), ("diag", 64), ("lowrank", 1), ("lowrank", 3), ("lowrank", 5)])
def test_quadratic_form_matches_explicit_precision(form, rank):
    x = sample()
    cfg = CovarianceConfig(form=form, eps=0.01, rank=rank)
    qf = quadratic_form(batch_moments(torch.from_numpy(x)), cfg)
    P = explicit_precision(x, form, 0.01, rank)
    dev = x - x.mean(0)
    ref = np.einsum("md,de,me->m", dev, P, dev)
    got = qf.distance_sq(torch.from_numpy(x))[:, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_lowrank_with_full_rank_equals_full():
    x = torch.from_numpy(sample())
    m = batch_moments(x)
    full = quadratic_form(m, CovarianceConfig(form="full")).distance_sq(x)
    low = quadratic_form(m, CovarianceConfig(form="lowrank", rank=6)).distance_sq(x)
    torch.testing.assert_close(low, full, rtol=1e-10, atol=0)


def test_oas_matches_scikit_learn():
    x = sample(n=50, d=8, seed=3)
    m = batch_moments(torch.from_numpy(x))
    ours = oas_shrinkage(m.covariance(), m.n)[0].numpy()
    ref, _ = oas(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_singular_covariance_gives_finite_distances():
    x = torch.from_numpy(sample(d=4))
    x = torch.cat([x, x[:, :1], torch.ones(len(x), 1)], dim=1)  # duplicated and constant features
    for form in ("full", "diag", "lowrank"):
        for eps in (0.0, 0.01):
            qf = quadratic_form(batch_moments(x), CovarianceConfig(form=form, eps=eps, rank=3))
            assert torch.isfinite(qf.distance_sq(x)).all(), (form, eps)


@pytest.mark.parametrize("kwargs, match", [
    ({"form": "dense"}, "covariance must be one of"),
    ({"shrinkage": "lw"}, "shrinkage must be one of"),
    ({"eps": -1.0}, "eps must be >= 0"),
    ({"rank": 0}, "rank must be >= 1"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CovarianceConfig(**kwargs)


def test_subspace_iteration_converges_when_k_exceeds_the_sample_rank(caplog):
    """Rank-20 samples + ridge, k = 32 > 20: the last Ritz vectors lie on the ridge plateau, made
    slightly uneven by rounding-level noise (as float32 batch reductions leave it), where subspace
    iteration stalls. They must be accepted (no fallback to a full eigh) with eigh's eigenvalues."""
    import logging

    from covguard.covariance import _EIGH_MAX_DIM, _top_eigenpairs

    D = _EIGH_MAX_DIM + 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, D, generator=gen, dtype=torch.float64) * torch.linspace(3, 1, D, dtype=torch.float64)
    noise = torch.randn(D, D, generator=gen, dtype=torch.float64) * 1e-6
    cov = (x.T @ x / 20 + (noise + noise.T) / 2 + 1e-3 * torch.eye(D, dtype=torch.float64))[None]  # (1, D, D)
    with caplog.at_level(logging.INFO, logger="covguard.covariance"):
        vals, vecs = _top_eigenpairs(cov, 32)
    assert "did not converge" not in caplog.text
    ref = torch.linalg.eigvalsh(cov[0])[-32:]
    torch.testing.assert_close(vals[0], ref, rtol=0, atol=1e-6 * float(ref[-1]))
    residual = torch.linalg.vector_norm(cov[0] @ vecs[0] - vecs[0] * vals[0], dim=0)
    assert float(residual.max()) <= 1e-6 * float(ref[-1])
