"""Fit speed options: per-coordinate statistics for diagonal forms, a seeded share of patch positions."""

import numpy as np
import pytest
import torch

import covguard as cg
from covguard.covariance import CovarianceConfig, diagonal_form, quadratic_form
from covguard.detectors.accumulators import draw_positions
from covguard.compact_stats import StreamingDiagonalMoments
from covguard.patches import patch_vectors_at
from covguard.stats import batch_moments


def test_streaming_diagonal_moments_equal_numpy_per_group_without_a_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=gen, dtype=torch.float64) * 3 + 10
    w = torch.rand(500, 4, generator=gen, dtype=torch.float64)
    w[:, 3] = 0  # an empty group
    acc = StreamingDiagonalMoments(7, 4)
    for i in range(0, 500, 64):  # batch size must not matter
        acc.update(x[i : i + 64].float(), w[i : i + 64].float())
    xn, wn = x.numpy(), w.numpy()
    for k in range(3):
        n = wn[:, k].sum()
        mean = (wn[:, k, None] * xn).sum(0) / n
        m2 = (wn[:, k, None] * (xn - mean) ** 2).sum(0)
        np.testing.assert_allclose(acc.n[k].item(), n, rtol=1e-6)
        np.testing.assert_allclose(acc.mean[k].numpy(), mean, rtol=1e-5)
        np.testing.assert_allclose(acc.m2[k].numpy(), m2, rtol=1e-4)
    assert acc.n[3] == 0


def test_diagonal_form_equals_the_full_moments_path():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)
    m = batch_moments(x)
    config = CovarianceConfig(form="diag", eps=0.05)
    ref = quadratic_form(m, config)
    got = diagonal_form(m.n, m.mean, torch.diagonal(m.scatter, dim1=-2, dim2=-1), config)
    torch.testing.assert_close(got.diag, ref.diag)
    torch.testing.assert_close(got.mean, ref.mean)
    with pytest.raises(ValueError, match="diagonal statistics give form='diag' with ridge"):
        diagonal_form(m.n, m.mean, m.scatter[:, 0], CovarianceConfig(form="diag", shrinkage="oas"))


@pytest.mark.parametrize("cls", [cg.SimpleMahalanobis, cg.ClassMahalanobis])
def test_diagonal_detector_keeps_only_per_coordinate_statistics_and_scores_as_the_exact_path(tiny_model, images, cls):
    x, y = images
    fit, hold = [(x[:160], y[:160])], [x[160:]]
    fast = cls(tiny_model, layers=["block1", "block2"], covariance="diag").fit(fit, holdout=hold, progress=False)
    exact = cls(tiny_model, layers=["block1", "block2"], covariance="diag", keep_moments=True).fit(fit, holdout=hold, progress=False)
    assert not fast.exact_moments and exact.exact_moments
    torch.testing.assert_close(fast.score(x[:30]), exact.score(x[:30]), rtol=1e-4, atol=1e-4)


def test_fit_positions_draws_a_seeded_share_of_each_images_patches(tiny_model, images):
    x, y = images
    kept = draw_positions(6, 10, 0.3, torch.Generator().manual_seed(0))  # 6 images x 10 positions
    assert kept.shape == (18,) and len(set(kept.tolist())) == 18
    assert [int((kept // 10 == i).sum()) for i in range(6)] == [3] * 6  # 3 positions of every image
    assert torch.equal(kept, draw_positions(6, 10, 0.3, torch.Generator().manual_seed(0)))
    assert draw_positions(6, 10, 1.0, torch.Generator()) is None

    def fitted(**kwargs):
        det = cg.ClassMahalanobis(tiny_model, layers=["block1"], keep_moments=True, **{"covariance": "full", "fit_positions": 1.0, **kwargs})
        return det.fit([(x[:160], y[:160])], progress=False)

    full, half, half_again, other = fitted(), fitted(fit_positions=0.5), fitted(fit_positions=0.5), fitted(fit_positions=0.5, random_state=1)
    L = 6 * 6  # block1 gives 8x8 maps: 6x6 positions of 3x3 patches without padding
    assert full.moments_["block1"].n.sum() == 160 * L and half.moments_["block1"].n.sum() == 160 * round(0.5 * L)
    assert torch.equal(half.score(x[:20]), half_again.score(x[:20]))  # seeded
    assert not torch.equal(half.score(x[:20]), other.score(x[:20]))
    with pytest.raises(ValueError, match="fit_positions must be a number in"):
        cg.SimpleMahalanobis(tiny_model, layers=["block1"], fit_positions=0, covariance="full")


@pytest.mark.parametrize("padding", [0, 1])
def test_patches_at_rows_equal_numpy_patches_of_an_explicit_unfold(padding):
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(3, 4, 5, 6, generator=gen)
    rows = torch.tensor([0, 7, 11, 12, 25, 30, 35])  # within 3 images x 12 positions (padding 0)
    fp = np.pad(f.numpy(), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    H2, W2 = fp.shape[2] - 2, fp.shape[3] - 2
    L = H2 * W2
    ref = np.stack([fp[r // L, :, (r % L) // W2 : (r % L) // W2 + 3, (r % L) % W2 : (r % L) % W2 + 3].reshape(-1) for r in rows.tolist()])
    np.testing.assert_array_equal(patch_vectors_at(f, rows, kernel_size=3, padding=padding).numpy(), ref)


def test_subsampled_fit_has_the_moments_of_the_drawn_patches_of_an_explicit_unfold(tiny_model, images):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1"], keep_moments=True, fit_positions=0.25, random_state=4, covariance="full")
    det.fit([(x[:50], y[:50]), (x[50:120], y[50:120])], progress=False)
    feats = []
    with torch.no_grad():
        handle = tiny_model.block1.register_forward_hook(lambda m, i, o: feats.append(o.double().numpy()))
        tiny_model(x[:50]), tiny_model(x[50:120])
        handle.remove()
    gen, drawn = torch.Generator().manual_seed(4), []
    for f in feats:  # (N, C, 8, 8): 6 x 6 positions of 3x3 patches, no padding
        patches = np.stack([f[:, :, i : i + 3, j : j + 3].reshape(len(f), -1) for i in range(6) for j in range(6)], 1)  # (N, L, D)
        drawn.append(patches.reshape(-1, patches.shape[-1])[draw_positions(len(f), 36, 0.25, gen).numpy()])
    drawn = np.concatenate(drawn)
    m = det.moments_["block1"]
    assert m.n.item() == len(drawn) == 120 * 9
    np.testing.assert_allclose(m.mean[0].numpy(), drawn.mean(0), rtol=1e-6, atol=1e-8)
    centered = drawn - drawn.mean(0)
    np.testing.assert_allclose(m.scatter[0].numpy(), centered.T @ centered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [cg.SimpleMahalanobis, cg.ClassMahalanobis])
def test_the_default_is_low_rank_32_from_five_percent_of_the_positions(tiny_model, images, cls):
    x, y = images
    det = cls(tiny_model, layers=["block1"], keep_moments=True).fit([(x[:160], y[:160])], progress=False)
    L = 6 * 6  # 3x3 patches of the 8x8 block1 maps
    assert det.moments_["block1"].n.sum() == 160 * round(0.05 * L)  # 2 drawn positions per image
    form = det.forms_["block1"]
    assert (det.covariance, det.rank) == ("lowrank", 32) and form.proj.shape[-1] == 32
    assert torch.equal(form.diag, form.diag[:, :1].expand_as(form.diag))  # top-32 eigenpairs + an isotropic residual
    exact = cls(tiny_model, layers=["block1"], covariance="lowrank", rank=32, fit_positions=1.0).fit([(x[:160], y[:160])], progress=False)
    assert exact.forms_["block1"].proj.shape == form.proj.shape and not torch.equal(exact.forms_["block1"].mean, form.mean)
