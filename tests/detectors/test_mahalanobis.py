"""Simple and Class patch Mahalanobis against an explicit numpy float64 computation."""

import numpy as np
import pytest
import torch
from conftest import make_images

import covguard as cg


def feature_maps(model, x):
    """Reference feature capture without hooks: call the stages directly."""
    with torch.no_grad():
        f1 = model.block1(x)
        f2 = model.block2(f1)
    return {"block1": f1.double().numpy(), "block2": f2.double().numpy()}


def unfold_np(f, k=3):
    """(N, C, H, W) -> (N, L, C*k*k) with loops, channel-major."""
    N, C, H, W = f.shape
    out = [[f[n, :, i : i + k, j : j + k].reshape(-1) for i in range(H - k + 1) for j in range(W - k + 1)] for n in range(N)]
    return np.asarray(out)


def ridge_inverse(p, w=None, eps=0.01):
    cov = np.cov(p, rowvar=False, aweights=w, bias=True)
    D = cov.shape[0]
    return np.average(p, axis=0, weights=w), np.linalg.inv(cov + eps * np.trace(cov) / D * np.eye(D))


def loader(x, y, batch):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def test_simple_matches_numpy_reference(tiny_model, images):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit(loader(x, y, 50), progress=False)
    x_test, _ = make_images(20, seed=7, shift=0.1)
    got = det.layer_scores(x_test)
    train, test = feature_maps(tiny_model, x), feature_maps(tiny_model, x_test)
    for i, layer in enumerate(("block1", "block2")):
        p = unfold_np(train[layer]).reshape(-1, train[layer].shape[1] * 9)
        mu, P = ridge_inverse(p)
        q = unfold_np(test[layer]) - mu  # (N, L, D)
        ref = np.einsum("nld,de,nle->nl", q, P, q).mean(1)
        np.testing.assert_allclose(got[:, i].numpy(), ref, rtol=2e-4)


@pytest.mark.parametrize("scoring", ["top1", "mixture"])
def test_class_matches_numpy_reference(tiny_model, images, scoring):
    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=["block2"], scoring=scoring, top_m=2, covariance="full", fit_positions=1.0).fit(loader(x, y, 64), progress=False)
    x_test, _ = make_images(15, seed=8, shift=0.05)
    got = det.score(x_test).double().numpy()
    train, test = feature_maps(tiny_model, x)["block2"], feature_maps(tiny_model, x_test)["block2"]
    p_train, p_test = unfold_np(train), unfold_np(test)  # (N, L, D)
    d2 = []
    for k in range(3):
        mu, P = ridge_inverse(p_train[y.numpy() == k].reshape(-1, p_train.shape[-1]))
        q = p_test - mu
        d2.append(np.einsum("nld,de,nle->nl", q, P, q))
    d2 = np.stack(d2, axis=1)  # (N, K, L)
    with torch.no_grad():
        probs = tiny_model(x_test).double().softmax(1).numpy()
    if scoring == "top1":
        ref = d2[np.arange(len(x_test)), probs.argmax(1)].mean(-1)
    else:
        top = np.argsort(-probs, axis=1)[:, :2]
        pi = np.take_along_axis(probs, top, 1)
        pi /= pi.sum(1, keepdims=True)
        ref = np.einsum("nm,nml->nl", pi, np.take_along_axis(d2, top[:, :, None], 1)).mean(-1)
    np.testing.assert_allclose(got, ref, rtol=2e-4)


def test_probs_weights_match_weighted_numpy(tiny_model, images):
    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=["block2"], class_weights="probs", covariance="diag", fit_positions=1.0).fit([x[:100], x[100:]], progress=False)
    with torch.no_grad():
        probs = tiny_model(x).double().softmax(1).numpy()
    p = unfold_np(feature_maps(tiny_model, x)["block2"])  # (N, L, D)
    L = p.shape[1]
    for k in range(3):
        w = np.repeat(probs[:, k], L)
        mu = np.average(p.reshape(-1, p.shape[-1]), axis=0, weights=w)
        np.testing.assert_allclose(det.forms_["block2"].mean[k].numpy(), mu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [cg.SimpleMahalanobis, cg.ClassMahalanobis])
@pytest.mark.parametrize("covariance", ["full", "diag", "lowrank"])
def test_shifted_inputs_score_higher(tiny_model, images, cls, covariance):
    x, y = images
    det = cls(tiny_model, layers=["block1", "block2"], covariance=covariance, rank=8).fit(loader(x, y, 64), progress=False)
    clean, _ = make_images(60, seed=3)
    shifted = (clean + 0.3 * torch.rand(clean.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    assert det.score(shifted).mean() > det.score(clean).mean()


def test_fit_is_invariant_to_batch_size(tiny_model, images):
    x, y = images
    a = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0).fit(loader(x, y, 1), progress=False)
    b = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0).fit(loader(x, y, 240), progress=False)
    # Batches are reduced in float32 (merged in float64): ~1e-6 relative in the statistics,
    # amplified by the precision's conditioning into the scores.
    torch.testing.assert_close(a.score(x[:10]), b.score(x[:10]), rtol=1e-4, atol=0)


def test_score_map_shapes_and_max_aggregate(tiny_model, images):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1", "block2"], aggregate="max", padding={"block1": 1, "block2": 0}, covariance="full", fit_positions=1.0)
    det.fit(loader(x, y, 80), progress=False)
    maps = det.distance_maps(x[:4])
    assert maps["block1"].shape == (4, 8, 8) and maps["block2"].shape == (4, 2, 2)
    layer_scores = det.layer_scores(x[:4])  # (4, 2) float64
    torch.testing.assert_close(layer_scores[:, 1], maps["block2"].flatten(1).amax(1).double())


def test_layers_combined_by_holdout_zscores(tiny_model, images):
    x, y = images
    holdout, _ = make_images(50, seed=11)
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit(loader(x, y, 80), holdout=[holdout], progress=False)
    hold = det.layer_scores(holdout)  # (N, 2) float64
    z = (hold - hold.mean(0)) / hold.std(0)
    torch.testing.assert_close(det.score(holdout).double(), z.sum(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(det.combine(hold), det.score(holdout))


def test_empty_class_falls_back_to_pooled_with_warning(tiny_model, images):
    x, y = images
    keep = y != 2
    with pytest.warns(RuntimeWarning, match=r"classes \[2\] have no fit samples"):
        det = cg.ClassMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0).fit(loader(x[keep], y[keep], 64), progress=False)
    assert torch.isfinite(det.score(x)).all()


def test_save_load_round_trip(tiny_model, images, tmp_path):
    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=["block1", "block2"], covariance="lowrank", rank=5, scoring="mixture", fit_positions=1.0)
    det.fit(loader(x, y, 64), progress=False)
    path = cg.save(det, tmp_path / "det.safetensors")
    loaded = cg.load(path, tiny_model)
    assert isinstance(loaded, cg.ClassMahalanobis) and loaded.get_params() == det.get_params()
    assert torch.equal(loaded.score(x[:20]), det.score(x[:20]))


def test_load_refuses_model_with_other_channels(tiny_model, images, tmp_path):
    from conftest import TinyCNN

    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0).fit(loader(x, y, 64), progress=False)
    other = TinyCNN()
    other.block1[0] = torch.nn.Conv2d(1, 5, 3, padding=1)
    other.block1[1] = torch.nn.BatchNorm2d(5)
    other.block2[1] = torch.nn.Conv2d(5, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"'block1': fitted C=4, model C=5"):
        cg.load(cg.save(det, tmp_path / "d.safetensors"), other)


def test_load_refuses_corrupt_file(tmp_path, tiny_model):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        cg.load(bad, tiny_model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cg.load(tmp_path / "missing.safetensors", tiny_model)


@pytest.mark.parametrize(
    "make_x, error, match",
    [
        (lambda x: x[0], ValueError, r"x must be a 4-D tensor \(N, C, H, W\); got shape \(1, 8, 8\)"),
        (lambda x: x.repeat(1, 3, 1, 1), ValueError, "x must have C=1 channels"),
        (lambda x: x.double(), ValueError, "x must have the model's dtype torch.float32; got torch.float64"),
        (lambda x: x.numpy(), TypeError, "x must be a torch.Tensor"),
        (lambda x: x[:, :, :2, :2], ValueError, "layer 'block2' outputs a 1x1 map, too small for kernel_size=3"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_model, images, make_x, error, match):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0).fit(loader(x, y, 120), progress=False)
    with pytest.raises(error, match=match):
        det.score(make_x(x[:4]))


def test_unfitted_unknown_layer_and_empty_loader(tiny_model, images):
    x, y = images
    with pytest.raises(cg.NotFittedError, match="not fitted yet"):
        cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0).score(x)
    with pytest.raises(ValueError, match=r"layers \['conv9'\] are not modules of the model; valid names: \["):
        cg.SimpleMahalanobis(tiny_model, layers=["conv9"], covariance="full", fit_positions=1.0)
    with pytest.raises(ValueError, match="loader is empty"):
        cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0).fit([], progress=False)
    with pytest.raises(ValueError, match="needs labels"):
        cg.ClassMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0).fit([x], progress=False)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        cg.SimpleMahalanobis(tiny_model, layers=["block1"], aggregate="median", covariance="full", fit_positions=1.0)


def test_nan_activations_at_fit_name_the_batch(tiny_model, images):
    x, y = images
    bad = x[:10].clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="activations of layer 'block1' in batch 1 contain NaN or inf"):
        cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0).fit([x[:10], bad], progress=False)


def test_nonfinite_input_scores_inf_with_warning(tiny_model, images):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit(loader(x, y, 120), progress=False)
    bad = x[:4].clone()
    bad[1, 0, 2, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="1 of 4 inputs have non-finite activations"):
        s = det.score(bad)
    assert torch.isinf(s[1]) and torch.isfinite(s[[0, 2, 3]]).all()


def test_model_mode_is_restored(tiny_model, images):
    x, y = images
    tiny_model.train()
    try:
        det = cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0).fit(loader(x, y, 120), progress=False)
        det.score(x[:3])
        assert tiny_model.training
    finally:
        tiny_model.eval()
