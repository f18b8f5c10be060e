"""FusedDetector: one forward pass, p-values against each member's own calibration, Fisher / min-p."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import TinyCNN, make_images

import covguard as cg
from covguard.detectors.fused import FusedDetector
from covguard.detectors.knn import KNN
from covguard.detectors.mds import MDS
from covguard.detectors.msp import MSP
from covguard.detectors.odin import ODIN
from covguard.features import FeatureTap

pytestmark = pytest.mark.usefixtures("one_thread")


def make_members(model):
    return {
        "simple": cg.SimpleMahalanobis(model, layers=["block1", "block2"], covariance="full", fit_positions=1.0),
        "mds": MDS(model),
        "knn": KNN(model, k=5),
        "msp": MSP(model),
    }


def reference_fused(member_scores, calibration, rule, tail_size=20):
    """Fisher or Sidak min-p of numpy p-values: (1 + #{c >= s}) / (n + 1), exponential tail past max c."""
    log_p = []
    for name, s in member_scores.items():
        c = np.sort(calibration[name].double().numpy())
        n, k = len(c), min(tail_size, len(c) - 1)
        sigma = c[n - k :].mean() - c[n - k - 1]
        s = s.double().numpy()
        inside = np.log((1 + (c[None, :] >= s[:, None]).sum(1)) / (n + 1))
        log_p.append(np.where(s > c[-1], -(s - c[-1]) / sigma - np.log(n + 1), inside))
    log_p = np.stack(log_p, 1)  # (N, M)
    if rule == "fisher":
        return -2 * log_p.sum(1)
    m, log_min = log_p.shape[1], log_p.min(1)
    with np.errstate(divide="ignore"):  # p_min underflows far in the tail: 1 - (1 - p)^m = m p to 1e-300
        exact = -np.log(-np.expm1(m * np.log1p(-np.exp(log_min))))
    return np.where(log_min < -700, -(np.log(m) + log_min), exact)


@pytest.fixture(scope="module")
def data(images):
    x, y = images
    return {"train": [(x[i : i + 64], y[i : i + 64]) for i in range(0, 160, 64)], "cal": [x[160:]]}


@pytest.fixture(scope="module")
def fused(tiny_model, data):
    return FusedDetector(make_members(tiny_model)).fit(data["train"], calibration=data["cal"], progress=False)


@pytest.mark.parametrize("rule", ["fisher", "minp"])
def test_fused_score_equals_combining_each_members_own_score(tiny_model, data, fused, rule):
    det = FusedDetector(fused.members, rule=rule).calibrate(data["cal"], progress=False)
    x = make_images(40, seed=2)[0]
    x[:5] += torch.linspace(0.05, 0.6, 5)[:, None, None, None]  # inputs past the largest calibration score: the tail
    own = {name: m.score(x) for name, m in det.members.items()}
    calibration = {name: m.score(data["cal"][0]) for name, m in det.members.items()}
    expected = reference_fused(own, calibration, rule)
    assert (np.stack([own[n].double().numpy() > calibration[n].double().max().item() for n in own]).any(0)).sum() >= 3
    calls = []
    hook = tiny_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        got = det.score(x)
    finally:
        hook.remove()
    assert len(calls) == 1  # every member from one forward pass
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)
    raw = det.members_scores(x)
    for name in own:
        torch.testing.assert_close(raw[name], own[name])


def test_fused_score_does_not_depend_on_batch_size(fused):
    x = make_images(37, seed=3)[0]
    torch.testing.assert_close(fused.score(x), torch.cat([fused.score(x[i : i + 8]) for i in range(0, 37, 8)]))


@pytest.mark.parametrize("rule", ["fisher", "minp"])
def test_shifted_images_score_higher_than_clean(fused, rule):
    det = FusedDetector(fused.members, rule=rule).set_calibration(fused.calibration_)
    clean, _ = make_images(60, seed=4)
    shifted, _ = make_images(60, seed=4, shift=0.3)
    assert det.score(shifted).mean() > det.score(clean).mean()


def test_a_member_returning_non_finite_scores_flags_the_input(tiny_model, data):
    class Failing(MSP):
        fail = False

        def score_features(self, logits, feats):
            s = super().score_features(logits, feats).clone()
            if self.fail:
                s[0], s[1] = math.inf, math.nan
            return s

    det = FusedDetector({"knn": KNN(tiny_model, k=5), "failing": Failing(tiny_model)}, rule="minp")
    det.fit(data["train"], calibration=data["cal"], progress=False)
    guard = cg.Guard(tiny_model, det).calibrate([make_images(500, seed=5)[0]], tpr=0.95, progress=False)
    det.members["failing"].fail = True
    x = make_images(6, seed=6)[0]
    with pytest.warns(RuntimeWarning, match="member 'failing' gave non-finite scores to 2 of 6"):
        out = guard(x)
    assert torch.isinf(out.scores[:2]).all() and torch.isfinite(out.scores[2:]).all()
    assert out.flagged[:2].all()


def test_members_on_different_models_or_with_changed_weights_are_refused(tiny_model, data):
    with pytest.raises(ValueError, match=r"same model object; \['other'\] wrap another model"):
        FusedDetector({"msp": MSP(tiny_model), "knn": KNN(tiny_model), "other": MSP(TinyCNN())})
    model = copy.deepcopy(tiny_model)
    simple = cg.SimpleMahalanobis(model, layers=["block2"], covariance="full", fit_positions=1.0).fit(data["train"], progress=False)
    with torch.no_grad():
        model.fc.bias += 1.0  # fine-tuned after the member's fit
    with pytest.raises(ValueError, match=r"members \['simple'\] were fitted on other weights"):
        FusedDetector({"simple": simple, "msp": MSP(model)})


def test_construction_is_validated(tiny_model):
    with pytest.raises(ValueError, match="non-empty dict"):
        FusedDetector({})
    with pytest.raises(TypeError, match="member 'x' must be a covguard Detector"):
        FusedDetector({"x": tiny_model})
    with pytest.raises(ValueError, match="rule must be one of"):
        FusedDetector({"msp": MSP(tiny_model)}, rule="mean")
    with pytest.raises(ValueError, match="tail_size must be an int >= 1"):
        FusedDetector({"msp": MSP(tiny_model)}, tail_size=0)
    with pytest.raises(ValueError, match=r"members \['odin'\] override score"):
        FusedDetector({"msp": MSP(tiny_model), "odin": ODIN(tiny_model)})
    det = FusedDetector({"knn": KNN(tiny_model, k=5), "simple": cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0)})
    assert det.layers == ("avgpool", "block1")
    with pytest.raises(cg.NotFittedError):
        det.score(make_images(2, seed=0)[0])
    with pytest.raises(NotImplementedError, match="calibrate"):
        det.partial_fit(torch.zeros(2, 3), {})


def test_prefitted_members_are_kept_and_only_the_others_are_fitted(tiny_model, data):
    knn = KNN(tiny_model, k=5).fit([data["train"][0][0]], progress=False)
    bank = knn.bank_
    det = FusedDetector({"knn": knn, "mds": MDS(tiny_model)}).fit(data["train"], calibration=data["cal"], progress=False)
    assert det.members["knn"].bank_ is bank and det.members["mds"].is_fitted
    with pytest.raises(ValueError, match=r"members \['mds'\] are not fitted"):
        FusedDetector({"knn": knn, "mds": MDS(tiny_model)}).fit(None, calibration=data["cal"])


def test_calibration_levels_agree(tiny_model, fused, data):
    x_cal = data["cal"][0]
    with torch.no_grad(), FeatureTap(tiny_model, fused.layers) as tap:
        logits, feats = tap(x_cal)
    by_features = FusedDetector(fused.members).calibrate_features(logits, feats)
    by_scores = FusedDetector(fused.members).set_calibration({n: m.score(x_cal) for n, m in fused.members.items()})
    for det in (by_features, by_scores):
        for name in fused.members:
            torch.testing.assert_close(det.calibration_[name], fused.calibration_[name])
            assert det.tail_scales_[name] == pytest.approx(fused.tail_scales_[name])
    assert fused.input_shape_ == (1, 8, 8)
    assert all((c.diff() >= 0).all() and c.dtype == torch.float64 for c in fused.calibration_.values())


def test_set_calibration_is_validated(fused):
    good = {name: torch.rand(30) for name in fused.members}
    with pytest.raises(ValueError, match=r"missing \['msp'\], unexpected \['other'\]"):
        FusedDetector(fused.members).set_calibration({**{k: v for k, v in good.items() if k != "msp"}, "other": torch.rand(3)})
    with pytest.raises(ValueError, match="member 'knn' are not finite at 1 of 30 images"):
        FusedDetector(fused.members).set_calibration({**good, "knn": torch.rand(30).index_fill(0, torch.tensor([4]), math.nan)})
    with pytest.raises(ValueError, match="n >= 2"):
        FusedDetector(fused.members).set_calibration({**good, "knn": torch.rand(1)})
    with pytest.raises(ValueError, match="members .* were fitted on another shape"):
        FusedDetector(fused.members).set_calibration(good, input_shape=(3, 8, 8))
    with pytest.warns(UserWarning, match="tail is fitted on 9 < tail_size=20"):
        FusedDetector(fused.members).set_calibration({**good, "knn": torch.rand(10)})


def test_get_params_and_clone(fused):
    params = fused.get_params()
    assert params["rule"] == "fisher" and params["tail_size"] == 20
    assert all(params["members"][n] is m for n, m in fused.members.items())
    other = fused.clone(rule="minp")
    assert other.rule == "minp" and not other.is_fitted
    for name, member in fused.members.items():
        assert type(other.members[name]) is type(member) and other.members[name] is not member
        assert other.members[name].is_fitted == (not member.requires_fit)
    with pytest.raises(ValueError, match="no parameters"):
        fused.clone(k=3)
