"""Refitting covariance forms from kept moments, and the held-out log-likelihood criterion."""

import math

import numpy as np
import pytest
import torch

import covguard as cg
from covguard.covariance import CovarianceConfig, quadratic_form
from covguard.detectors.likelihood import log_likelihood
from covguard.stats import batch_moments
from tests.conftest import make_images


def loader(x, y, batch_size):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


@pytest.mark.parametrize("form, rank", [("full", 0), ("diag", 0), ("lowrank", 5)])
def test_logdet_matches_dense_precision(form, rank):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen, dtype=torch.float64)
    w = torch.nn.functional.one_hot(torch.arange(400) % 2, 2).double()
    qf = quadratic_form(batch_moments(x, w), CovarianceConfig(form=form, rank=max(rank, 1)))
    P = torch.zeros(2, 12, 12, dtype=torch.float64)
    if qf.proj is not None:
        P += torch.einsum("kdr,kr,ker->kde", qf.proj, qf.gain, qf.proj)
    if qf.diag is not None:
        P += torch.diag_embed(qf.diag)
    np.testing.assert_allclose(qf.logdet().numpy(), np.linalg.slogdet(P.numpy())[1], rtol=1e-10)


@pytest.mark.parametrize("cls", [cg.SimpleMahalanobis, cg.ClassMahalanobis])
@pytest.mark.parametrize("covariance, rank, aggregate", [("diag", 64, "mean"), ("lowrank", 8, "max"), ("full", 64, "max")])
def test_refit_equals_a_detector_fitted_with_those_settings(tiny_model, images, cls, covariance, rank, aggregate):
    x, y = images
    fit, hold = loader(x[:200], y[:200], 50), [x[200:]]
    base = cls(tiny_model, layers=["block1", "block2"], keep_moments=True, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    got = base.refit(holdout=hold, covariance=covariance, rank=rank, aggregate=aggregate)
    ref = cls(tiny_model, layers=["block1", "block2"], covariance=covariance, rank=rank, aggregate=aggregate, fit_positions=1.0).fit(
        fit, holdout=hold, progress=False
    )
    test, _ = make_images(20, seed=9)
    torch.testing.assert_close(got.score(test), ref.score(test), rtol=1e-4, atol=1e-4)
    assert base.config.form == "full" and base.aggregate == "mean"  # the original is untouched
    torch.testing.assert_close(base.score(test), cls(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False).score(test), rtol=1e-4, atol=1e-4)


def test_refit_without_kept_moments_is_a_clear_error(tiny_model, images):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0).fit(loader(x, y, 60), progress=False)
    assert det.moments_ == {}
    with pytest.raises(ValueError, match="keep_moments=True"):
        det.refit(holdout=None, covariance="diag")


def test_log_likelihood_is_the_gaussian_density_of_unfolded_patches(tiny_model, images):
    """Against scipy-free numpy: mean over patches of log N(p; mu, Sigma) / D, Sigma = P^-1."""
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="lowrank", rank=6, fit_positions=1.0).fit(loader(x, y, 60), progress=False)
    test, _ = make_images(5, seed=11)
    ll = log_likelihood(det, test)[:, 0].numpy()
    with torch.no_grad():
        _, feats = det.forward(test)
    p = torch.nn.functional.unfold(feats["block2"].double(), 3).transpose(1, 2).numpy()  # (N, L, D)
    qf = det.forms_["block2"]
    P = (torch.einsum("kdr,kr,ker->kde", qf.proj, qf.gain, qf.proj) + torch.diag_embed(qf.diag))[0].numpy()
    D = P.shape[0]
    dev = p - qf.mean[0].numpy()
    d2 = np.einsum("nld,de,nle->nl", dev, P, dev)
    ref = (-0.5 * (d2 + D * math.log(2 * math.pi) - np.linalg.slogdet(P)[1])).mean(1) / D
    np.testing.assert_allclose(ll, ref, rtol=1e-4)


def test_held_out_likelihood_prefers_full_covariance_on_correlated_features(tiny_model, images):
    x, y = images
    base = cg.SimpleMahalanobis(tiny_model, layers=["block2"], keep_moments=True, covariance="full", fit_positions=1.0).fit(loader(x[:200], y[:200], 50), progress=False)
    diag = base.refit(holdout=None, covariance="diag")
    assert log_likelihood(base, x[200:]).mean() > log_likelihood(diag, x[200:]).mean()
