"""Property-based hardening: merges, non-finite values, bad shapes, degenerate and extreme data.

A model whose tapped layer is the identity (``feat``) lets each property control the feature
maps exactly. Hypothesis runs derandomized (fixed examples) without a database, so the suite
stays deterministic.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import covguard as cg
from covguard.stats import StreamingMoments, batch_moments

PROPERTY = settings(
    max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


class FeatNet(nn.Module):
    """Logits from pooled input; the tapped layer ``feat`` outputs the input itself."""

    def __init__(self, channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(channels * classes, dtype=torch.float32).reshape(classes, channels).cos())
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.feat(x).mean(dim=(2, 3)))


def smooth_maps(n: int, seed: int, channels: int = 2, size: int = 6) -> torch.Tensor:
    """(n, C, size, size) float32 maps with correlated channels."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size, size, generator=gen)
    return torch.cat([base + 0.5 * torch.randn(n, 1, size, size, generator=gen) for _ in range(channels)], dim=1)


def simple(model=None, **kwargs):
    return cg.SimpleMahalanobis(model or FeatNet().eval(), layers=["feat"], **{"covariance": "full", "fit_positions": 1.0, **kwargs})


# ---- merging statistics ------------------------------------------------------------------------


@PROPERTY
@given(
    data=st.data(),
    m=st.integers(2, 40),
    d=st.integers(1, 4),
    offset=st.sampled_from([0.0, 1e3, -1e6]),
)
def test_merge_is_invariant_to_batch_order_and_partition(data, m, d, offset):
    x = torch.from_numpy(np.random.default_rng(m * 10 + d).normal(size=(m, d)) * 2 + offset)
    order = data.draw(st.permutations(range(m)))
    cuts = sorted(data.draw(st.lists(st.integers(1, m - 1), max_size=5, unique=True)))
    acc = StreamingMoments(d)
    for part in np.split(np.asarray(order), cuts):
        acc.update(x[torch.as_tensor(part)])
    whole = batch_moments(x)
    ref = np.cov(x.numpy(), rowvar=False, bias=True).reshape(d, d)
    assert acc.moments.n.item() == m
    torch.testing.assert_close(acc.moments.mean, whole.mean, rtol=1e-12, atol=1e-12 * (1 + abs(offset)))
    np.testing.assert_allclose(acc.moments.covariance()[0].numpy(), ref, rtol=1e-8, atol=1e-9)


# ---- non-finite values ---------------------------------------------------------------------------


@PROPERTY
@given(
    n_batches=st.integers(1, 4),
    data=st.data(),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
)
def test_nonfinite_activation_at_fit_names_the_batch(n_batches, data, value):
    batches = [smooth_maps(5, seed=i) for i in range(n_batches)]
    bad = data.draw(st.integers(0, n_batches - 1))
    n, c, i, j = (data.draw(st.integers(0, s - 1)) for s in batches[bad].shape)
    batches[bad][n, c, i, j] = value
    with pytest.raises(ValueError, match=f"activations of layer 'feat' in batch {bad} contain NaN or inf"):
        simple().fit(batches, progress=False)


@pytest.fixture(scope="module")
def fitted():
    return simple().fit([smooth_maps(40, seed=0)], progress=False)


@PROPERTY
@given(data=st.data(), value=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_nonfinite_input_scores_inf_is_flagged_and_warned(fitted, data, value):
    x = smooth_maps(4, seed=1)
    n, c, i, j = (data.draw(st.integers(0, s - 1)) for s in x.shape)
    x[n, c, i, j] = value
    guard = cg.Guard(fitted.model, fitted)
    guard.calibration_ = cg.guard.Calibration(threshold=50.0, tpr=0.95, n=100, achieved_tpr=0.95)
    with pytest.warns(RuntimeWarning, match="1 of 4 inputs have non-finite activations; their score is \\+inf"):
        out = guard(x)
    assert out.scores[n] == float("inf") and out.flagged[n]
    others = [k for k in range(4) if k != n]
    assert torch.isfinite(out.scores[others]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # maps warn nothing: +inf where a patch touches the bad value
        m = fitted.distance_maps(x)["feat"]
    assert not torch.isnan(m).any() and torch.isinf(m[n]).any()


@pytest.mark.parametrize("aggregate", ["mean", "max", "topq"])
@pytest.mark.parametrize("relative", [False, True])
def test_every_aggregate_flags_nonfinite_and_recomputes_overflows(aggregate, relative):
    """Scores check all layers' maps at once; a NaN or an overflow sends them to the per-map checks."""
    model, train = FeatNet().eval(), smooth_maps(40, seed=12)
    kwargs = {"layers": ["feat"], "aggregate": aggregate, "covariance": "diag", "fit_positions": 1.0}
    if relative:
        det = cg.ClassMahalanobis(model, relative=True, class_weights="probs", **kwargs).fit([train], progress=False)
    else:
        det = cg.SimpleMahalanobis(model, **kwargs).fit([train], progress=False)
    x = smooth_maps(3, seed=14)
    clean = det.score(x)
    x[1, 0, 2, 2] = float("nan")
    x[2] = 3e30  # squares overflow float32: recomputed in float64
    with pytest.warns(RuntimeWarning, match="1 of 3 inputs have non-finite activations"):
        s = det.score(x)
    assert s[1] == float("inf") and torch.isfinite(s[[0, 2]]).all() and s[0] == clean[0]
    layer_scores = det.layer_scores(x)
    assert layer_scores[1, 0] == float("inf") and torch.isfinite(layer_scores[[0, 2]]).all()


# ---- bad inputs ----------------------------------------------------------------------------------


@PROPERTY
@given(
    shape=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.uint8]),
)
def test_bad_inputs_raise_errors_naming_the_problem(fitted, shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    if len(shape) != 4:
        expected = r"x must be a 4-D tensor \(N, C, H, W\); got shape"
    elif dtype != torch.float32:
        expected = f"x must have the model's dtype torch.float32; got {dtype}"
    elif shape[1] != 2:
        expected = f"x must have C=2 channels \\(as at fit time\\); got {shape[1]}"
    elif min(shape[2:]) < 3:
        expected = "layer 'feat' outputs a .* map, too small for kernel_size=3 with padding=0"
    else:
        assert torch.isfinite(fitted.score(x)).all()
        return
    with pytest.raises(ValueError, match=expected):
        fitted.score(x)


def test_non_tensor_input_is_a_type_error(fitted):
    with pytest.raises(TypeError, match="x must be a torch.Tensor of shape"):
        fitted.score(np.zeros((1, 2, 6, 6), dtype=np.float32))


# ---- degenerate data -------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["full", "diag", "lowrank"])
def test_constant_channel_gives_finite_scores(covariance):
    x = smooth_maps(30, seed=2)
    x[:, 1] = 3.0  # one constant channel: singular patch covariance
    det = simple(covariance=covariance, rank=4).fit([x], progress=False)
    test = smooth_maps(10, seed=3)
    s = det.score(test)
    assert torch.isfinite(s).all() and (s > det.score(x[:10])).all()


def test_all_constant_features_are_a_clear_error():
    with pytest.raises(ValueError, match="fit patches of layer 'feat' have zero variance in every coordinate"):
        simple().fit([torch.full((5, 2, 6, 6), 0.7)], progress=False)


def test_one_sample():
    one = smooth_maps(1, seed=4)
    det = simple().fit([one], progress=False)  # one image, 16 patches: fine
    assert torch.isfinite(det.score(smooth_maps(3, seed=5))).all()
    with pytest.raises(ValueError, match="have zero variance in every coordinate .* or a single patch"):
        simple().fit([one[:, :, :3, :3]], progress=False)  # one patch


def test_class_with_one_patch_uses_the_pooled_covariance():
    x = smooth_maps(12, seed=6, size=3)  # one 3x3 patch per image
    y = torch.tensor([0] * 6 + [1] * 5 + [2])  # class 2 has a single patch
    model = FeatNet().eval()
    with pytest.warns(RuntimeWarning, match=r"groups \[2\] have zero variance at layer 'feat'"):
        det = cg.ClassMahalanobis(model, layers=["feat"], covariance="full", fit_positions=1.0).fit([(x, y)], progress=False)
    assert torch.isfinite(det.score(smooth_maps(20, seed=7, size=3))).all()


def test_empty_class_gives_finite_scores():
    x, model = smooth_maps(20, seed=8), FeatNet().eval()
    with pytest.warns(RuntimeWarning, match=r"classes \[1\] have no fit samples"):
        det = cg.ClassMahalanobis(model, layers=["feat"], scoring="mixture", top_m=3, covariance="full", fit_positions=1.0).fit(
            [(x, torch.arange(20) % 2 * 2)], progress=False
        )
    assert torch.isfinite(det.score(smooth_maps(10, seed=9))).all()


# ---- extreme magnitudes --------------------------------------------------------------------------


@PROPERTY
@given(
    exponent=st.integers(-30, 30),
    covariance=st.sampled_from(["full", "diag", "lowrank"]),
    aggregate=st.sampled_from(["mean", "max"]),
)
def test_scores_are_scale_invariant_from_1e_minus_30_to_1e30(exponent, covariance, aggregate):
    scale = 10.0**exponent
    train, test = smooth_maps(30, seed=10), smooth_maps(6, seed=11) * 1.5
    ref = simple(covariance=covariance, rank=4, aggregate=aggregate).fit([train], progress=False).score(test)
    det = simple(covariance=covariance, rank=4, aggregate=aggregate).fit([train * scale], progress=False)
    got = det.score(test * scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore:calibrating on:UserWarning")
@PROPERTY
@given(exponent=st.integers(10, 38), sign=st.sampled_from([1.0, -1.0]))
def test_huge_inputs_score_finite_and_flagged_never_nan(exponent, sign):
    model = FeatNet().eval()
    train = smooth_maps(30, seed=12)
    det = cg.SimpleMahalanobis(model, layers=["feat"], covariance="full", fit_positions=1.0).fit([train], progress=False)
    guard = cg.Guard(model, det).calibrate([smooth_maps(200, seed=13)], tpr=0.9, progress=False)
    x = smooth_maps(3, seed=14)
    x[1] = sign * 3.0 * 10.0**exponent
    out = guard(x)
    assert torch.isfinite(out.scores).all() and out.flagged[1]
    assert out.scores[1] > out.scores[[0, 2]].max()


# ---- issue 14, minor: constructor and calibration arguments -----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": "feat"}, ValueError, "got the string 'feat'"),
        ({"eps": float("inf")}, ValueError, "eps must be >= 0 and finite; got inf"),
        ({"eps": float("nan")}, ValueError, "eps must be >= 0 and finite; got nan"),
        ({"eps": "0.01"}, TypeError, "eps must be a real number >= 0; got str '0.01'"),
        ({"rank": "8"}, TypeError, "rank must be an integer >= 1; got str '8'"),
        ({"rank": 2.5}, TypeError, "rank must be an integer >= 1; got float 2.5"),
    ],
)
def test_constructor_arguments_are_validated(kwargs, error, match):
    model = FeatNet().eval()
    layers = kwargs.pop("layers", ["feat"])
    with pytest.raises(error, match=match):
        cg.SimpleMahalanobis(model, layers=layers, **kwargs)


@pytest.mark.parametrize("name", ["kernel_size", "padding"])
def test_fractional_kernel_size_and_padding_are_refused(name):
    with pytest.raises((TypeError, ValueError), match=name):
        simple(**{name: 2.7})


@pytest.mark.parametrize(("tpr", "error"), [("0.95", TypeError), (None, TypeError), (float("nan"), ValueError), (0.0, ValueError)])
def test_calibrate_tpr_is_validated(fitted, tpr, error):
    with pytest.raises(error, match="tpr must be"):
        cg.Guard(fitted.model, fitted).calibrate([smooth_maps(10, seed=1)], tpr=tpr, progress=False)


def test_detector_score_warns_on_another_spatial_size(fitted):
    with pytest.warns(UserWarning, match="fitted on 6x6"):
        fitted.score(smooth_maps(2, seed=1, size=12))
