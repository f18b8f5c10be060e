"""Guard: calibrated threshold on held-out in-distribution scores, predictions, flags, persistence."""

import numpy as np
import pytest
import torch
from conftest import make_images

import covguard as cg
from covguard.detectors.odin import ODIN
from covguard.guard import Calibration

small_calibration = pytest.mark.filterwarnings("ignore:calibrating on:UserWarning")


def batches(x, size=500):
    return [x[i : i + size] for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def detector(tiny_model, images):
    x, _ = images
    return cg.SimpleMahalanobis(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit(batches(x, 80), progress=False)


def test_calibrated_tpr_holds_on_a_separate_split(tiny_model, detector):
    calibration, _ = make_images(4000, seed=20)
    test, _ = make_images(4000, seed=21)
    guard = cg.Guard(tiny_model, detector).calibrate(batches(calibration), tpr=0.95, progress=False)
    assert guard.calibration_.n == 4000 and guard.calibration_.achieved_tpr >= 0.95
    outs = [guard(b) for b in batches(test)]
    achieved = 1 - torch.cat([o.flagged for o in outs]).double().mean().item()
    assert abs(achieved - 0.95) < 0.015, achieved
    # other targets hold as well (same scores, thresholds from the calibration scores)
    cal_scores, test_scores = (
        detector.score_loader(batches(calibration), progress=False),
        torch.cat([o.scores for o in outs]),
    )
    for tpr in (0.9, 0.99):
        threshold = Calibration.from_scores(cal_scores, tpr).threshold
        achieved = (test_scores.double() <= threshold).double().mean().item()
        assert abs(achieved - tpr) < 0.015, (tpr, achieved)


def test_threshold_is_the_inverted_cdf_quantile():
    scores = torch.from_numpy(np.random.default_rng(0).gamma(2.0, size=1001))
    for tpr in (0.5, 0.9, 0.95, 0.999, 1.0):
        cal = Calibration.from_scores(scores, tpr)
        assert cal.threshold == np.quantile(scores.numpy(), tpr, method="inverted_cdf")
        assert cal.achieved_tpr == (scores <= cal.threshold).double().mean().item() >= tpr
    # tpr * n that is an integer up to rounding (0.95 * 4000 = 3800.0000000000005) picks the 3800th score
    assert Calibration.from_scores(torch.arange(4000.0), 0.95).threshold == 3799.0


@small_calibration
def test_guard_outputs_match_model_and_detector(tiny_model, detector, images):
    x, _ = images
    guard = cg.Guard(tiny_model, detector).calibrate([make_images(300, seed=22)[0]], tpr=0.9, progress=False)
    shifted = (x[:50] + 0.4 * torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    batch = torch.cat([x[:50], shifted])
    out = guard(batch)
    assert isinstance(out, cg.GuardResult)
    assert torch.equal(out.predictions, tiny_model(batch).argmax(1))
    assert torch.equal(out.scores, detector.score(batch))
    assert torch.equal(out.flagged, out.scores.double() > guard.threshold_)
    assert out.flagged.dtype == torch.bool and out.flagged[50:].float().mean() > out.flagged[:50].float().mean()


@small_calibration
def test_nonfinite_input_is_flagged_with_warning(tiny_model, detector, images):
    x, _ = images
    guard = cg.Guard(tiny_model, detector).calibrate([make_images(300, seed=22)[0]], progress=False)
    bad = x[:3].clone()
    bad[2, 0, 4, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 of 3 inputs have non-finite activations"):
        out = guard(bad)
    assert out.scores[2] == float("inf") and out.flagged[2]
    assert torch.isfinite(out.scores[:2]).all()


@small_calibration
def test_guard_uses_the_detectors_own_score_when_overridden(tiny_model, images):
    x, _ = images
    odin = ODIN(tiny_model)
    guard = cg.Guard(tiny_model, odin).calibrate([x[:100]], tpr=0.9, progress=False)
    out = guard(x[100:110])
    assert torch.equal(out.scores, odin.score(x[100:110]))
    assert torch.equal(out.predictions, tiny_model(x[100:110]).argmax(1))


@small_calibration
def test_save_and_load_guard(tiny_model, detector, images, tmp_path):
    x, _ = images
    guard = cg.Guard(tiny_model, detector).calibrate([make_images(300, seed=22)[0]], tpr=0.9, progress=False)
    path = guard.save(tmp_path / "guard.safetensors")
    loaded = cg.load_guard(path, tiny_model)
    assert loaded.calibration_ == guard.calibration_
    a, b = guard(x[:20]), loaded(x[:20])
    assert torch.equal(a.scores, b.scores) and torch.equal(a.flagged, b.flagged)
    assert isinstance(cg.load(path, tiny_model), cg.SimpleMahalanobis)  # the same file is a plain detector


def test_guard_errors(tiny_model, detector, images, tmp_path):
    from conftest import TinyCNN

    x, _ = images
    guard = cg.Guard(tiny_model, detector)
    with pytest.raises(ValueError, match="not calibrated yet"):
        guard(x[:2])
    with pytest.raises(ValueError, match="not calibrated yet"):
        guard.save(tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\]"):
        guard.calibrate([x], tpr=1.5)
    with pytest.raises(ValueError, match="same model object"):
        cg.Guard(TinyCNN(), detector)
    with pytest.raises(cg.NotFittedError):
        cg.Guard(tiny_model, cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0)).calibrate([x])
    bad = x[:20].clone()
    bad[4] = float("inf")
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(ValueError, match=r"1 of 20 calibration images \(positions \[4\]\) have non-finite"),
    ):
        guard.calibrate([bad], progress=False)
    with pytest.warns(UserWarning, match=r"TPR on new data will vary by about \+-4.9 points"):
        guard.calibrate([x[:20]], progress=False)
    with pytest.raises(ValueError, match="holds a detector without a guard calibration"):
        cg.load_guard(cg.save(detector, tmp_path / "d.safetensors"), tiny_model)
