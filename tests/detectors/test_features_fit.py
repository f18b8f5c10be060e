"""The public features-level fit (partial_fit / finish_fit), parameters as given, clone, refit, eval mode."""

import pytest
import torch
from torch import nn

import covguard as cg
from covguard.bench.common import add_mixture
from covguard.detectors.baselines import BASELINES
from covguard.features import FeatureTap, eval_mode


def _captured(model, layers, x, y, batch=64):
    """(logits, feats, y) of each batch, captured once."""
    with torch.no_grad(), FeatureTap(model, layers) as tap:
        return [(*tap(x[i : i + batch]), y[i : i + batch]) for i in range(0, len(x), batch)]


@pytest.mark.parametrize(
    "make",
    [
        lambda m: cg.SimpleMahalanobis(m, layers=["block1"], covariance="full", fit_positions=1.0),
        lambda m: cg.ClassMahalanobis(m, layers=["block2"], covariance="diag", fit_positions=1.0),
        lambda m: cg.ClassMahalanobis(m, layers=["block2"], covariance="lowrank", rank=4, basis_rank=8, fit_positions=1.0),
        lambda m: BASELINES["vim"](m),
        lambda m: BASELINES["knn"](m),
        lambda m: BASELINES["mds"](m),
    ],
    ids=["simple", "class", "class-basis", "vim", "knn", "mds"],
)
def test_features_level_fit_equals_fit(tiny_model, images, make):
    x, y = images
    reference = make(tiny_model).fit([(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)], progress=False)
    det = make(tiny_model)
    batches = _captured(tiny_model, det.layers, x, y)
    for index in range(det.fit_passes):
        assert det.current_pass in (None, index)
        for logits, feats, yb in batches:
            det.partial_fit(logits, feats, yb)
        assert not det.is_fitted
        det.finish_fit(input_shape=tuple(x.shape[1:]))
    assert det.is_fitted and det.current_pass is None and det.input_shape_ == (1, 8, 8)
    torch.testing.assert_close(det.score(x[:20]), reference.score(x[:20]), rtol=1e-5, atol=1e-6)


def test_finish_fit_without_data_is_refused(tiny_model):
    with pytest.raises(ValueError, match="finish_fit needs partial_fit calls first"):
        cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0).finish_fit()


def test_parameters_are_stored_as_given_and_clone_changes_them(tiny_model, images):
    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=["block1", "block2"], kernel_size={"block1": 3, "block2": 1}, rank=8, covariance="full", fit_positions=1.0)
    params = det.get_params()
    assert params["kernel_size"] == {"block1": 3, "block2": 1} and params["layers"] == ("block1", "block2")
    assert params["rank"] == 8 and params["scoring"] == "top1" and "model" not in params
    det.fit([(x, y)], progress=False)
    other = det.clone(scoring="mixture")
    assert not other.is_fitted and other.get_params() == {**params, "scoring": "mixture"}
    assert det.get_params() == params  # the original is untouched
    with pytest.raises(ValueError, match=r"has no parameters \['nope'\]"):
        det.clone(nope=1)
    assert BASELINES["knn"](tiny_model).clone(k=3).get_params() == {"k": 3, "feature_layer": "avgpool"}


def test_mixture_from_top1_is_standardized_on_the_holdout(tiny_model, images):
    x, y = images
    holdout = [x[160:]]
    top1 = cg.ClassMahalanobis(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit([(x[:160], y[:160])], holdout=holdout, progress=False)
    detectors = {"class_mahalanobis_top1": top1}
    add_mixture(detectors, holdout)
    mixture = detectors["class_mahalanobis_mixture"]
    assert mixture.scoring == "mixture" and top1.scoring == "top1"
    z = (mixture.layer_scores(x[160:]) - mixture.score_mean_) / mixture.score_std_  # (N, 2)
    torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)
    # the same as fitting a mixture detector from scratch
    fresh = cg.ClassMahalanobis(tiny_model, layers=["block1", "block2"], scoring="mixture", covariance="full", fit_positions=1.0)
    fresh.fit([(x[:160], y[:160])], holdout=holdout, progress=False)
    torch.testing.assert_close(mixture.score(x[:40]), fresh.score(x[:40]), rtol=1e-5, atol=1e-5)


def test_eval_mode_restores_every_submodule(tiny_model):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    model.train()
    model[1].eval()  # a deliberately frozen BatchNorm inside a model in training
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


def test_eval_mode_switches_a_training_submodule_of_a_model_in_eval_mode():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5)), nn.ReLU()).eval()
    model[0][1].train()  # deep inside a model otherwise in eval mode
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model[0][1].training and not model.training and not model[0][0].training


def test_feature_tap_hooks_the_module_a_name_holds_now():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(2, 1, 5, 5)
    with torch.no_grad(), FeatureTap(model, ["1"]) as tap:
        tap(x)
    model[1] = nn.Tanh()  # replaced after a first tap
    with torch.no_grad(), FeatureTap(model, ["1"]) as tap:
        _, feats = tap(x)
    assert feats["1"].min() < 0  # Tanh, not the old ReLU
    with pytest.raises(ValueError, match=r"layers \['9'\] are not modules of the model"):
        FeatureTap(model, ["9"])
    with pytest.raises(ValueError, match="must be distinct"):
        FeatureTap(model, ["1", "1"])


def test_model_dtype_and_device_follow_the_parameters_order():
    from covguard.features import model_device, model_dtype

    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Linear(2, 3).double(), nn.Linear(3, 1)))
    model.register_module("missing", None)
    assert model_dtype(model) == torch.float64 and model_device(model) == torch.device("cpu")
    counter = nn.Module()
    counter.register_parameter("step", nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False))
    assert model_dtype(nn.Sequential(counter, nn.Linear(2, 2).half())) == torch.float16  # the first floating one
    assert model_dtype(nn.ReLU()) == torch.float32 and model_device(nn.ReLU()) == torch.device("cpu")
