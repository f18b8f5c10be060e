"""The OpenOOD baselines against independent numpy / scipy / scikit-learn computations."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_images
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from covguard.detectors import Detector
from covguard.detectors.baselines import BASELINES
from covguard.detectors.knn import kth_neighbor_distance

pytestmark = pytest.mark.usefixtures("one_thread")

LOGIT_ONLY = {"msp", "max_logit", "energy", "odin", "gen"}


def loader(x, y, batch):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def penultimate(model, x):
    """Reference features without hooks: call the stages directly; (N, 6) float64."""
    with torch.no_grad():
        return model.avgpool(model.block2(model.block1(x))).flatten(1).double().numpy()


def logits_np(model, x):
    with torch.no_grad():
        return model(x).double().numpy()


def head(model):
    return model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()


@pytest.fixture(scope="module")
def x_test():
    clean, _ = make_images(30, seed=7)
    shifted, _ = make_images(30, seed=8, shift=0.1)
    return torch.cat([clean, shifted])


@pytest.fixture(scope="module")
def fitted(tiny_model, images):
    """Every baseline with default settings, fitted on the 240 training images in batches of 64."""
    x, y = images
    dets = {}
    for name, cls in BASELINES.items():
        det = cls(tiny_model)
        dets[name] = det.fit(loader(x, y, 64), progress=False) if det.requires_fit else det
    return dets


# ---- logit-only baselines --------------------------------------------------------------------


def gen_np(logits, gamma, top_m):
    p = np.sort(softmax(logits, axis=1), axis=1)[:, -top_m:]
    return (p**gamma * (1 - p) ** gamma).sum(1)


@pytest.mark.parametrize(
    "name, kwargs, reference",
    [
        ("msp", {}, lambda l: -softmax(l, axis=1).max(1)),
        ("max_logit", {}, lambda l: -l.max(1)),
        ("energy", {}, lambda l: -logsumexp(l, axis=1)),
        ("energy", {"temperature": 2.5}, lambda l: -2.5 * logsumexp(l / 2.5, axis=1)),
        ("gen", {}, lambda l: gen_np(l, 0.1, 3)),  # M = 100 clipped to K = 3
        ("gen", {"gamma": 0.5, "top_m": 2}, lambda l: gen_np(l, 0.5, 2)),
    ],
)
def test_logit_baselines_match_scipy(tiny_model, x_test, name, kwargs, reference):
    det = BASELINES[name](tiny_model, **kwargs)
    assert not det.requires_fit and det.is_fitted
    np.testing.assert_allclose(det.score(x_test).double().numpy(), reference(logits_np(tiny_model, x_test)), rtol=1e-5, atol=1e-6)


def test_gen_keeps_the_top_class_term_of_confident_predictions():
    from covguard.detectors.gen import generalized_entropy

    logits = torch.tensor([[50.0, 0.0, 0.0]])  # p_max = 1 - 2e-22: 1 - p_max is 0 in float32 and float64
    q = np.exp(-50.0) / (1 + 2 * np.exp(-50.0))  # each other probability
    expected = (2 * q) ** 0.1 + 2 * q**0.1 * (1 - q) ** 0.1
    assert generalized_entropy(logits, 0.1, 100).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature, noise", [(1000.0, 0.0014), (10.0, 0.02)])
def test_odin_matches_manual_autograd(tiny_model, x_test, temperature, noise):
    model = copy.deepcopy(tiny_model)  # the reference writes .grad; keep the shared model clean
    xr = x_test.clone().requires_grad_(True)
    out = model(xr)
    torch.nn.functional.cross_entropy(out / temperature, out.argmax(1)).backward()  # mean, as OpenOOD
    x_tilde = x_test - noise * (torch.ge(xr.grad, 0).float() - 0.5) * 2
    ref = -softmax(logits_np(model, x_tilde) / temperature, axis=1).max(1)
    got = BASELINES["odin"](tiny_model, temperature=temperature, noise=noise).score(x_test)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-6)
    unperturbed = -softmax(logits_np(model, x_test) / temperature, axis=1).max(1)
    assert np.abs(ref - unperturbed).max() > 1e-6  # the perturbation is not a no-op here


def fresh_copy(model):
    """A copy of the model without the .grad its training left behind."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    return model


def test_odin_leaves_no_gradients_and_is_batch_independent(tiny_model, x_test):
    model = fresh_copy(tiny_model)
    x = x_test.clone()
    det = BASELINES["odin"](model)
    whole = det.score(x)
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and not x.requires_grad and torch.equal(x, x_test)
    parts = torch.cat([det.score(x[i : i + 7]) for i in range(0, len(x), 7)])
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(det.score_loader(loader(x, torch.zeros(len(x), dtype=torch.long), 16), progress=False), whole)
    with torch.no_grad():  # the input gradient is still taken
        torch.testing.assert_close(det.score(x), whole)


# ---- penultimate-feature baselines -----------------------------------------------------------


def class_sq_distances(f_train, y_train, f_test):
    """Class means, tied covariance via sklearn on class-centered features, explicit d2; (N, K)."""
    means = np.stack([f_train[y_train == k].mean(0) for k in range(3)])
    P = EmpiricalCovariance().fit(f_train - means[y_train]).precision_
    return np.stack([np.einsum("nc,cd,nd->n", f_test - m, P, f_test - m) for m in means], axis=1)


def test_mds_matches_sklearn(tiny_model, images, x_test, fitted):
    x, y = images
    f_train, f_test = penultimate(tiny_model, x), penultimate(tiny_model, x_test)
    ref = class_sq_distances(f_train, y.numpy(), f_test).min(1)
    np.testing.assert_allclose(fitted["mds"].score(x_test).double().numpy(), ref, rtol=1e-5)


def test_rmds_matches_two_gaussians(tiny_model, images, x_test, fitted):
    x, y = images
    f_train, f_test = penultimate(tiny_model, x), penultimate(tiny_model, x_test)
    background = EmpiricalCovariance().fit(f_train)  # mean and covariance of all features
    d2_0 = background.mahalanobis(f_test)  # squared
    ref = (class_sq_distances(f_train, y.numpy(), f_test) - d2_0[:, None]).min(1)
    np.testing.assert_allclose(fitted["rmds"].score(x_test).double().numpy(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [50, 7])
def test_knn_matches_sklearn_nearest_neighbors(tiny_model, images, x_test, k):
    x, y = images
    normalize = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
    nn_index = NearestNeighbors(n_neighbors=k).fit(normalize(penultimate(tiny_model, x)))
    ref = nn_index.kneighbors(normalize(penultimate(tiny_model, x_test)))[0][:, -1]
    det = BASELINES["knn"](tiny_model, k=k).fit(loader(x, y, 64), progress=False)
    np.testing.assert_allclose(det.score(x_test).double().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_knn_with_k_equals_a_fresh_fit_and_shares_the_bank(tiny_model, images, x_test, fitted):
    x, y = images
    derived = fitted["knn"].with_k(7)
    fresh = BASELINES["knn"](tiny_model, k=7).fit(loader(x, y, 64), progress=False)
    assert derived.k == derived.k_ == 7 and fitted["knn"].k_ == 50  # the source keeps its k
    assert derived.bank_ is fitted["knn"].bank_
    torch.testing.assert_close(derived.score(x_test), fresh.score(x_test))
    with pytest.warns(RuntimeWarning, match="k=1000 exceeds the 240 fit images; using k=240"):
        assert fitted["knn"].with_k(1000).k_ == 240
    with pytest.raises(ValueError, match="k must be >= 1"):
        fitted["knn"].with_k(0)


def test_knn_search_does_not_depend_on_chunk_size():
    gen = torch.Generator().manual_seed(0)
    q, bank = torch.randn(9, 5, generator=gen), torch.randn(100, 5, generator=gen)
    full = kth_neighbor_distance(q, bank, 10)
    torch.testing.assert_close(kth_neighbor_distance(q, bank, 10, chunk=7), full)
    torch.testing.assert_close(full, torch.cdist(q, bank).sort(1).values[:, 9])


def vim_np(f_train, f_test, W, b, dim):
    """ViM following the paper: origin u, principal space of E[(f-u)(f-u)^T], alpha, virtual logit."""
    u = -np.linalg.pinv(W) @ b
    X = f_train - u
    evals, evecs = np.linalg.eigh(X.T @ X / len(X))
    R = evecs[:, np.argsort(-evals)[dim:]]  # (C, C - dim) off the principal space
    alpha = (f_train @ W.T + b).max(1).mean() / np.linalg.norm(X @ R, axis=1).mean()
    return alpha * np.linalg.norm((f_test - u) @ R, axis=1) - logsumexp(f_test @ W.T + b, axis=1)


@pytest.mark.parametrize("dim", [None, 2])
def test_vim_matches_numpy(tiny_model, images, x_test, dim):
    x, y = images
    det = BASELINES["vim"](tiny_model, dim=dim).fit(loader(x, y, 64), progress=False)
    W, b = head(tiny_model)
    ref = vim_np(penultimate(tiny_model, x), penultimate(tiny_model, x_test), W, b, 3 if dim is None else dim)
    np.testing.assert_allclose(det.score(x_test).double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_react_matches_numpy_percentile(tiny_model, images, x_test, fitted):
    x, _ = images
    threshold = np.percentile(penultimate(tiny_model, x).ravel(), 90)
    assert fitted["react"].threshold_ == pytest.approx(threshold, rel=1e-12)
    W, b = head(tiny_model)
    ref = -logsumexp(np.minimum(penultimate(tiny_model, x_test), threshold) @ W.T + b, axis=1)
    np.testing.assert_allclose(fitted["react"].score(x_test).double().numpy(), ref, rtol=1e-5)


def test_mds_fit_is_invariant_to_batch_size(tiny_model, images, x_test, fitted):
    x, y = images
    one = BASELINES["mds"](tiny_model).fit(loader(x, y, 1), progress=False)
    torch.testing.assert_close(one.score(x_test), fitted["mds"].score(x_test), rtol=1e-5, atol=0)


# ---- properties shared by every baseline -----------------------------------------------------


def test_registry_lists_every_baseline():
    assert set(BASELINES) == {"msp", "max_logit", "energy", "odin", "gen", "mds", "rmds", "knn", "vim", "react"}
    assert all(issubclass(cls, Detector) for cls in BASELINES.values())
    assert {name for name, cls in BASELINES.items() if not cls.requires_fit} == LOGIT_ONLY


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_shifted_inputs_score_higher(fitted, name):
    # A constant brightness shift of 0.1 (clamped to [0, 1]): every baseline, the logit-only ones
    # included, ranks it above clean images of the same seed on the tiny model. (ODIN's scores
    # at T = 1000 all lie near -1/K, so its margin is small but deterministic.)
    clean, _ = make_images(60, seed=3)
    shifted, _ = make_images(60, seed=3, shift=0.1)
    det = fitted[name]
    assert det.score(shifted).mean() > det.score(clean).mean()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_model_mode_is_restored(tiny_model, images, name):
    x, y = images
    model = fresh_copy(tiny_model).train()
    running_mean = model.block1[1].running_mean.clone()
    det = BASELINES[name](model)
    if det.requires_fit:
        det.fit(loader(x, y, 120), progress=False)
    det.score(x[:5])
    assert model.training
    assert torch.equal(model.block1[1].running_mean, running_mean)  # BatchNorm ran in eval mode
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_nonfinite_input_scores_inf_with_warning(fitted, images, name):
    x, _ = images
    bad = x[:4].clone()
    bad[1, 0, 2, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="1 of 4 inputs have non-finite activations"):
        s = fitted[name].score(bad)
    assert torch.isinf(s[1]) and s[1] > 0 and torch.isfinite(s[[0, 2, 3]]).all()


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mds", "rmds", "knn", "vim", "react"])
def test_spatial_feature_layer_is_refused(tiny_model, images, name):
    x, y = images
    det = BASELINES[name](tiny_model, feature_layer="block2")
    with pytest.raises(ValueError, match=r"feature_layer 'block2' must output pooled penultimate features .* got shape \(64, 6, 4, 4\)"):
        det.fit(loader(x, y, 64), progress=False)


@pytest.mark.parametrize("name", ["mds", "rmds"])
def test_class_baselines_need_labels(tiny_model, images, name):
    x, _ = images
    with pytest.raises(ValueError, match="needs labels: the loader must yield"):
        BASELINES[name](tiny_model).fit([x], progress=False)


@pytest.mark.parametrize("name", ["vim", "react"])
def test_fc_layer_must_be_linear(tiny_model, name):
    with pytest.raises(ValueError, match="fc_layer 'avgpool' must be an nn.Linear"):
        BASELINES[name](tiny_model, fc_layer="avgpool")
    with pytest.raises(ValueError, match="fc_layer 'linear' is not a module of the model"):
        BASELINES[name](tiny_model, fc_layer="linear")


def test_degenerate_settings_warn_or_raise(tiny_model, images):
    x, y = images
    with pytest.warns(RuntimeWarning, match="k=50 exceeds the 20 fit images; using k=20"):
        BASELINES["knn"](tiny_model).fit([x[:20]], progress=False)
    with pytest.warns(RuntimeWarning, match="dim=9 is not below C=6; using dim=5"):
        BASELINES["vim"](tiny_model, dim=9).fit([x], progress=False)
    with pytest.raises(TypeError, match="reads the loader 2 times"):
        BASELINES["vim"](tiny_model).fit(iter([x]), progress=False)
    with pytest.warns(RuntimeWarning, match=r"classes \[2\] have no fit samples"):
        BASELINES["mds"](tiny_model).fit([(x[y != 2], y[y != 2])], progress=False)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 2\]"):
        BASELINES["mds"](tiny_model).fit([(x, y + 1)], progress=False)
