"""Detector variants (relative distances, normalized features, top-q aggregation, layer fusions)
against an explicit numpy float64 computation on unfolded patches."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_images
from test_mahalanobis import feature_maps, loader, ridge_inverse, unfold_np

import covguard as cg
from covguard.detectors.layer_fusion import GAUSSIAN_RIDGE
from covguard.detectors.likelihood import log_likelihood
from covguard.detectors.multi import _pooled_sources, fit_detectors

LAYERS = ["block1", "block2"]


@pytest.fixture(scope="module")
def split(images):
    x, y = images
    return loader(x[:200], y[:200], 50), [x[200:]], x[200:]


@pytest.fixture(scope="module")
def x_test():
    return make_images(24, seed=7, shift=0.05)[0]


def probs_of(model, x):
    with torch.no_grad():
        return model(x).double().softmax(1).numpy()


def d2_np(p, mu, P):
    """Squared distances (N, L) of patches (N, L, D)."""
    q = p - mu
    return np.einsum("nld,de,nle->nl", q, P, q)


# ---- defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, extra", [(cg.SimpleMahalanobis, {}), (cg.ClassMahalanobis, {"relative": False})])
def test_default_options_are_todays_detector_bit_for_bit(tiny_model, split, x_test, cls, extra):
    fit, hold, _ = split
    default = cls(tiny_model, layers=LAYERS).fit(fit, holdout=hold, progress=False)
    explicit = cls(tiny_model, layers=LAYERS, aggregate="mean", top_fraction=0.1, normalize="none", fusion="sum", **extra)
    explicit.fit(fit, holdout=hold, progress=False)
    assert torch.equal(default.score(x_test), explicit.score(x_test))
    assert set(default.fusion_state()) == {"mean", "std"} and default.background_forms_ == {}


# ---- relative patch distances ----------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["top1", "mixture"])
def test_relative_matches_numpy_reference(tiny_model, images, x_test, scoring):
    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=["block2"], scoring=scoring, top_m=2, relative=True, covariance="full", fit_positions=1.0)
    det.fit(loader(x, y, 64), progress=False)
    got = det.layer_scores(x_test)[:, 0].numpy()
    p_train, p_test = unfold_np(feature_maps(tiny_model, x)["block2"]), unfold_np(feature_maps(tiny_model, x_test)["block2"])
    flat = p_train.reshape(-1, p_train.shape[-1])
    shared = d2_np(p_test, *ridge_inverse(flat))  # (N, L)
    labels = np.repeat(y.numpy(), p_train.shape[1])
    d2 = np.stack([d2_np(p_test, *ridge_inverse(flat[labels == k])) for k in range(3)], axis=1)  # (N, K, L)
    probs = probs_of(tiny_model, x_test)
    if scoring == "top1":
        pi = np.eye(3)[probs.argmax(1)]
    else:
        top = np.argsort(-probs, axis=1)[:, :2]
        pi = np.zeros_like(probs)
        np.put_along_axis(pi, top, np.take_along_axis(probs, top, 1), 1)
        pi /= pi.sum(1, keepdims=True)
    ref = (np.einsum("nk,nkl->nl", pi, d2) - shared).mean(1)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * shared.mean())
    assert (det.distance_maps(x_test)["block2"] < 0).any()  # a difference: negative where the class fits better


def test_relative_background_is_the_pooled_class_moments(tiny_model, images):
    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=["block2"], covariance="diag", relative=True, fit_positions=1.0).fit(loader(x, y, 64), progress=False)
    simple = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="diag", fit_positions=1.0).fit(loader(x, y, 64), progress=False)
    bg, ref = det.background_forms_["block2"], simple.forms_["block2"]
    torch.testing.assert_close(bg.mean, ref.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bg.diag, ref.diag, rtol=1e-5, atol=0)


def test_relative_with_basis_rank_subtracts_the_exact_shared_form(tiny_model, images, x_test):
    x, y = images
    fit = loader(x, y, 64)
    common = {"layers": ["block2"], "covariance": "lowrank", "rank": 4, "fit_positions": 1.0}
    rel = cg.ClassMahalanobis(tiny_model, basis_rank=8, relative=True, **common).fit(fit, progress=False)
    absolute = cg.ClassMahalanobis(tiny_model, basis_rank=8, **common).fit(fit, progress=False)
    shared = cg.SimpleMahalanobis(tiny_model, **common).fit(fit, progress=False)
    got = rel.distance_maps(x_test)["block2"]
    ref = absolute.distance_maps(x_test)["block2"] - shared.distance_maps(x_test)["block2"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(shared.distance_maps(x_test)["block2"].mean()))


def test_relative_is_refit_from_kept_moments(tiny_model, split, x_test):
    fit, hold, _ = split
    base = cg.ClassMahalanobis(tiny_model, layers=LAYERS, keep_moments=True, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    got = base.refit(holdout=hold, relative=True)
    ref = cg.ClassMahalanobis(tiny_model, layers=LAYERS, relative=True, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    torch.testing.assert_close(got.score(x_test), ref.score(x_test), rtol=1e-4, atol=1e-4)
    back = got.refit(holdout=hold, relative=False)  # a scoring change: the class forms are kept
    torch.testing.assert_close(back.score(x_test), base.score(x_test), rtol=1e-6, atol=1e-6)
    plain = cg.ClassMahalanobis(tiny_model, layers=LAYERS, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    with pytest.raises(ValueError, match=r"refit of \['relative'\] needs the fitted moments"):
        plain.refit(holdout=hold, relative=True)
    with pytest.raises(ValueError, match="log_likelihood needs absolute distances"):
        log_likelihood(got, x_test)


# ---- normalized features ---------------------------------------------------------------------


def normalized_np(f):
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)


@pytest.mark.parametrize("cls", [cg.SimpleMahalanobis, cg.ClassMahalanobis])
def test_normalized_features_match_numpy_reference(tiny_model, images, x_test, cls):
    x, y = images
    det = cls(tiny_model, layers=LAYERS, normalize="position", padding={"block1": 1, "block2": 0}, covariance="full", fit_positions=1.0)
    det.fit(loader(x, y, 60), holdout=[x[:50]], progress=False)
    got = det.layer_scores(x_test).numpy()
    train, test = feature_maps(tiny_model, x), feature_maps(tiny_model, x_test)
    labels = probs_of(tiny_model, x_test).argmax(1)
    for i, (layer, pad) in enumerate((("block1", 1), ("block2", 0))):

        def patches(f):  # normalize each position, then zero-pad, then unfold
            return unfold_np(np.pad(normalized_np(f), ((0, 0), (0, 0), (pad, pad), (pad, pad))))

        p_train, p_test = patches(train[layer]), patches(test[layer])
        if cls is cg.SimpleMahalanobis:
            ref = d2_np(p_test, *ridge_inverse(p_train.reshape(-1, p_train.shape[-1]))).mean(1)
        else:
            per_class = [d2_np(p_test, *ridge_inverse(p_train[y.numpy() == k].reshape(-1, p_train.shape[-1]))) for k in range(3)]
            ref = np.stack(per_class, 1)[np.arange(len(x_test)), labels].mean(1)
        np.testing.assert_allclose(got[:, i], ref, rtol=2e-4)


def test_normalized_features_ignore_the_scale_of_the_map(tiny_model, images, x_test):
    x, y = images
    scaled = copy.deepcopy(tiny_model)
    with torch.no_grad():  # ReLU(5 conv) = 5 ReLU(conv): block2's map is 5 times larger
        scaled.block2[1].weight.mul_(5.0)
        scaled.block2[1].bias.mul_(5.0)
    a = cg.SimpleMahalanobis(tiny_model, layers=["block2"], normalize="position", covariance="full", fit_positions=1.0).fit(loader(x, y, 60), progress=False)
    b = cg.SimpleMahalanobis(scaled, layers=["block2"], normalize="position", covariance="full", fit_positions=1.0).fit(loader(x, y, 60), progress=False)
    torch.testing.assert_close(a.score(x_test), b.score(x_test), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"refit cannot change \['normalize'\]"):
        a.refit(holdout=None, normalize="none")


def test_normalized_fit_is_invariant_to_batch_size(tiny_model, images, x_test):
    x, y = images
    a = cg.SimpleMahalanobis(tiny_model, layers=["block2"], normalize="position", covariance="full", fit_positions=1.0).fit(loader(x, y, 1), progress=False)
    b = cg.SimpleMahalanobis(tiny_model, layers=["block2"], normalize="position", covariance="full", fit_positions=1.0).fit(loader(x, y, 240), progress=False)
    # float32 batch reductions (as test_fit_is_invariant_to_batch_size), merged in float64
    torch.testing.assert_close(a.score(x_test), b.score(x_test), rtol=1e-4, atol=0)


def test_simple_pools_class_moments_only_with_the_same_normalization(tiny_model, split, x_test):
    fit, hold, _ = split
    klass = cg.ClassMahalanobis(tiny_model, layers=LAYERS, normalize="position", covariance="full", fit_positions=1.0)
    plain = cg.SimpleMahalanobis(tiny_model, layers=LAYERS, covariance="full", fit_positions=1.0)
    normed = cg.SimpleMahalanobis(tiny_model, layers=LAYERS, normalize="position", covariance="full", fit_positions=1.0)
    assert set(_pooled_sources([plain, normed, klass])) == {normed}
    fit_detectors([plain, normed, klass], fit, holdout=hold, progress=False)
    alone = cg.SimpleMahalanobis(tiny_model, layers=LAYERS, normalize="position", covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    torch.testing.assert_close(normed.score(x_test), alone.score(x_test), rtol=1e-4, atol=1e-4)


# ---- top-q aggregation -----------------------------------------------------------------------


@pytest.mark.parametrize("top_fraction, count", [(0.1, 4), (0.25, 9), (0.01, 1)])
def test_topq_is_the_mean_of_the_largest_patch_distances(tiny_model, images, x_test, top_fraction, count):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1"], aggregate="topq", top_fraction=top_fraction, covariance="full", fit_positions=1.0)
    det.fit(loader(x, y, 60), progress=False)
    p_train, p_test = unfold_np(feature_maps(tiny_model, x)["block1"]), unfold_np(feature_maps(tiny_model, x_test)["block1"])
    d2 = d2_np(p_test, *ridge_inverse(p_train.reshape(-1, p_train.shape[-1])))  # (N, 36)
    ref = -np.sort(-d2, axis=1)[:, :count].mean(1)  # round(q * 36), at least 1
    np.testing.assert_allclose(det.layer_scores(x_test)[:, 0].numpy(), ref, rtol=2e-4)


def test_topq_spans_max_to_mean(tiny_model, split, x_test):
    fit, hold, _ = split
    base = cg.SimpleMahalanobis(tiny_model, layers=LAYERS, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    maps = base.distance_maps(x_test)
    every = base.refit(holdout=hold, aggregate="topq", top_fraction=1.0).layer_scores(x_test)
    one = base.refit(holdout=hold, aggregate="topq", top_fraction=1e-6).layer_scores(x_test)
    for i, layer in enumerate(LAYERS):
        torch.testing.assert_close(every[:, i], maps[layer].double().flatten(1).mean(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(one[:, i], maps[layer].double().flatten(1).amax(1))


# ---- layer fusion ----------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["max", "gaussian"])
def test_layer_fusion_matches_numpy_reference(tiny_model, split, x_test, fusion):
    fit, hold, hold_x = split
    det = cg.ClassMahalanobis(tiny_model, layers=LAYERS, fusion=fusion, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    h, s = det.layer_scores(hold_x).numpy(), det.layer_scores(x_test).numpy()  # (n, L), (N, L)
    mean, std = h.mean(0), h.std(0, ddof=1)
    z = (s - mean) / std
    if fusion == "max":
        ref = z.max(1)
    else:
        corr = np.cov(h, rowvar=False) / np.outer(std, std)
        ref = np.einsum("nl,lm,nm->n", z, np.linalg.inv(corr + GAUSSIAN_RIDGE * np.eye(len(LAYERS))), z)
        np.testing.assert_allclose(det.fusion_state()["correlation"].numpy(), corr, rtol=1e-10)
    np.testing.assert_allclose(det.score(x_test).double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_gaussian_fusion_is_two_sided(tiny_model, split):
    fit, hold, hold_x = split
    base = cg.SimpleMahalanobis(tiny_model, layers=LAYERS, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    gauss = base.refit(holdout=hold, fusion="gaussian")
    h = base.layer_scores(hold_x)  # (n, L)
    typical, too_typical = h.mean(0, keepdim=True), h.mean(0, keepdim=True) - 4 * h.std(0, keepdim=True)
    assert base.combine(too_typical) < base.combine(typical)  # the sum calls it more normal than normal
    assert gauss.combine(too_typical) > gauss.combine(typical) + 10  # the Gaussian flags it


@pytest.mark.parametrize("fusion", ["max", "gaussian"])
def test_refit_fusion_equals_a_detector_fitted_with_it(tiny_model, split, x_test, fusion):
    fit, hold, _ = split
    base = cg.SimpleMahalanobis(tiny_model, layers=LAYERS, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    got = base.refit(holdout=hold, fusion=fusion)
    ref = cg.SimpleMahalanobis(tiny_model, layers=LAYERS, fusion=fusion, covariance="full", fit_positions=1.0).fit(fit, holdout=hold, progress=False)
    torch.testing.assert_close(got.score(x_test), ref.score(x_test), rtol=1e-4, atol=1e-4)
    assert base.fusion == "sum" and got.get_params()["fusion"] == fusion


def test_gaussian_fusion_of_one_layer_needs_holdout(tiny_model, images, x_test):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block2"], fusion="gaussian", covariance="full", fit_positions=1.0).fit(loader(x, y, 60), holdout=[x[:80]], progress=False)
    s, h = det.layer_scores(x_test)[:, 0], det.layer_scores(x[:80])[:, 0]
    torch.testing.assert_close(det.score(x_test).double(), (s - h.mean()) ** 2 / h.var() / (1 + GAUSSIAN_RIDGE), rtol=1e-5, atol=1e-6)
    one = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0).fit(loader(x, y, 60), progress=False)
    with pytest.raises(ValueError, match="holdout must hold in-distribution images"):
        one.refit(holdout=None, fusion="gaussian")
    assert not one.needs_holdout and one.refit(holdout=None, fusion="max").needs_holdout is False


# ---- every variant: shift, state, validation -------------------------------------------------

VARIANTS = [
    (cg.SimpleMahalanobis, {"normalize": "position"}),
    (cg.SimpleMahalanobis, {"aggregate": "topq", "top_fraction": 0.2}),
    (cg.SimpleMahalanobis, {"fusion": "max"}),
    (cg.SimpleMahalanobis, {"fusion": "gaussian"}),
    (cg.ClassMahalanobis, {"relative": True}),
    (cg.ClassMahalanobis, {"relative": True, "covariance": "lowrank", "rank": 4, "basis_rank": 8, "fusion": "gaussian"}),
    (cg.ClassMahalanobis, {"normalize": "position", "scoring": "mixture", "aggregate": "topq"}),
]


@pytest.mark.parametrize("cls, options", VARIANTS)
def test_shifted_inputs_score_higher_and_state_reinstalls(tiny_model, images, cls, options):
    x, y = images
    det = cls(tiny_model, layers=LAYERS, **options).fit(loader(x, y, 64), holdout=[x[:60]], progress=False)
    clean, _ = make_images(60, seed=3)
    shifted = (clean + 0.3 * torch.rand(clean.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    assert det.score(shifted).mean() > det.score(clean).mean()
    # What persistence stores: the hyperparameters, the forms, the fusion state, the background forms.
    state = det.fusion_state()
    copy_ = cls(tiny_model, **det.get_params())
    copy_.set_state(
        det.forms_, det.channels_, score_mean=state["mean"], score_std=state["std"], input_shape=det.input_shape_,
        model_sha256=det.model_sha256_, score_correlation=state.get("correlation"),
        background_forms=det.background_forms_ or None,
    )
    assert torch.equal(copy_.score(clean), det.score(clean))


def test_set_state_refuses_missing_or_extra_variant_state(tiny_model, images):
    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=LAYERS, relative=True, fusion="gaussian", covariance="full", fit_positions=1.0).fit(loader(x, y, 64), progress=False)
    state = det.fusion_state()
    common = {"score_mean": state["mean"], "score_std": state["std"], "input_shape": det.input_shape_, "model_sha256": None}
    with pytest.raises(ValueError, match="relative=True needs background_forms"):
        cg.ClassMahalanobis(tiny_model, **det.get_params()).set_state(det.forms_, det.channels_, **common, score_correlation=state["correlation"])
    with pytest.raises(ValueError, match="fusion='gaussian' needs correlation"):
        cg.ClassMahalanobis(tiny_model, **det.get_params()).set_state(
            det.forms_, det.channels_, **common, background_forms=det.background_forms_
        )
    with pytest.raises(ValueError, match="relative=False takes no background_forms"):
        cg.ClassMahalanobis(tiny_model, layers=LAYERS, fusion="gaussian", covariance="full", fit_positions=1.0).set_state(
            det.forms_, det.channels_, **common, score_correlation=state["correlation"], background_forms=det.background_forms_
        )


@pytest.mark.parametrize(
    "cls, options, match",
    [
        (cg.SimpleMahalanobis, {"aggregate": "median"}, r"aggregate must be one of \('mean', 'max', 'topq'\)"),
        (cg.SimpleMahalanobis, {"top_fraction": 0.0}, r"top_fraction must be a number in \(0, 1\]; got 0.0"),
        (cg.SimpleMahalanobis, {"top_fraction": 1.5}, r"top_fraction must be a number in \(0, 1\]; got 1.5"),
        (cg.SimpleMahalanobis, {"normalize": "patch"}, r"normalize must be one of \('none', 'position'\); got 'patch'"),
        (cg.SimpleMahalanobis, {"fusion": "mean"}, r"fusion must be one of \('sum', 'max', 'gaussian'\); got 'mean'"),
        (cg.ClassMahalanobis, {"relative": "yes"}, "relative must be True or False; got 'yes'"),
    ],
)
def test_bad_variant_options_raise_clear_errors(tiny_model, cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(tiny_model, layers=LAYERS, **options)
