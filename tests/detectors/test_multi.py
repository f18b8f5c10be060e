"""fit_detectors / score_detectors give what each detector's own fit / score gives."""

import pytest
import torch

import covguard as cg
from covguard.detectors.baselines import BASELINES
from covguard.detectors.multi import fit_detectors, score_detectors


def make(model):
    return {
        "simple": cg.SimpleMahalanobis(model, layers=["block1", "block2"], covariance="full", fit_positions=1.0),
        "class": cg.ClassMahalanobis(model, layers=["block2"], covariance="lowrank", rank=4, fit_positions=1.0),
        "mds": BASELINES["mds"](model),
        "vim": BASELINES["vim"](model),
        "msp": BASELINES["msp"](model),
        "odin": BASELINES["odin"](model),
    }


def test_joint_fit_and_score_equal_separate(tiny_model, images):
    x, y = images
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 200, 64)]
    holdout = [x[200:]]
    joint, alone = make(tiny_model), make(tiny_model)
    fit_detectors(list(joint.values()), loader, holdout=holdout, progress=False)
    for det in alone.values():
        if isinstance(det, cg.detectors.PatchMahalanobis):
            det.fit(loader, holdout=holdout, progress=False)
        elif det.requires_fit:
            det.fit(loader, progress=False)
    scores = score_detectors(joint, x[:50], batch_size=16)
    for name, det in alone.items():
        combined, layers = scores[name]
        torch.testing.assert_close(combined, det.score(x[:50]), rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        if isinstance(det, cg.detectors.PatchMahalanobis):
            ref = det.layer_scores(x[:50])  # (50, L)
            assert list(layers) == list(det.layers)
            for i, layer in enumerate(det.layers):
                torch.testing.assert_close(layers[layer], ref[:, i], rtol=1e-4, atol=1e-6)


def test_detectors_of_different_models_are_refused(tiny_model, images):
    from conftest import TinyCNN

    with pytest.raises(ValueError, match="same model object"):
        fit_detectors([cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0), cg.SimpleMahalanobis(TinyCNN(), layers=["block1"], covariance="full", fit_positions=1.0)], [images[0]])
    with pytest.raises(ValueError, match="at least one detector"):
        fit_detectors([], [images[0]])


@pytest.mark.parametrize("class_weights, pooled", [("label", True), ("correct", False)])
def test_simple_next_to_label_class_takes_pooled_class_moments(tiny_model, images, class_weights, pooled):
    from covguard.detectors.multi import _pooled_sources

    x, y = images
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 200, 64)]
    holdout = [x[200:]]
    simple = cg.SimpleMahalanobis(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0)
    klass = cg.ClassMahalanobis(tiny_model, layers=["block2", "block1"], class_weights=class_weights, covariance="full", fit_positions=1.0)
    assert (simple in _pooled_sources([simple, klass])) == pooled
    fit_detectors([simple, klass], loader, holdout=holdout, progress=False)
    alone = cg.SimpleMahalanobis(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit(loader, holdout=holdout, progress=False)
    for layer in ("block1", "block2"):
        torch.testing.assert_close(simple.forms_[layer].mean, alone.forms_[layer].mean, rtol=1e-6, atol=1e-6)  # float32 batch reductions
    torch.testing.assert_close(simple.score(x[:20]), alone.score(x[:20]), rtol=1e-4, atol=1e-4)


def test_simple_with_other_patch_geometry_is_not_pooled(tiny_model):
    from covguard.detectors.multi import _pooled_sources

    simple = cg.SimpleMahalanobis(tiny_model, layers=["block2"], kernel_size=1, covariance="full", fit_positions=1.0)
    klass = cg.ClassMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0)
    assert _pooled_sources([simple, klass]) == {}
