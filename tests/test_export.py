"""Export: GuardedModel reproduces the guard in torch; the ONNX file reproduces it in onnxruntime."""

import json

import pytest
import torch
from safetensors.torch import save_file

import covguard as cg
from covguard.cli import main
from covguard.export import GuardedModel
from conftest import make_images

pytestmark = pytest.mark.filterwarnings("ignore:calibrating on:UserWarning")
LAYERS = ["block1", "block2"]


def guard_for(model, images, detector=cg.SimpleMahalanobis, **kwargs):
    x, y = images
    det = detector(model, layers=LAYERS, **kwargs).fit([(x[:160], y[:160])], holdout=[x[160:200]], progress=False)
    return cg.Guard(model, det).calibrate([x[200:]], tpr=0.9, progress=False)


def probe_images(images):
    """ID images, shifted images and a constant image: scores from low to very high."""
    shifted, _ = make_images(16, seed=5, shift=0.4)
    return torch.cat([images[0][:16], shifted, torch.zeros(1, 1, 8, 8)])


CASES = [
    (cg.SimpleMahalanobis, {"covariance": "full"}),
    (cg.SimpleMahalanobis, {"covariance": "diag", "aggregate": "max"}),
    (cg.SimpleMahalanobis, {"covariance": "lowrank", "rank": 4, "padding": 1}),
    (cg.ClassMahalanobis, {"covariance": "full"}),
    (cg.ClassMahalanobis, {"covariance": "diag"}),
    (cg.ClassMahalanobis, {"covariance": "lowrank", "rank": 4, "aggregate": "max"}),
    (cg.ClassMahalanobis, {"covariance": "full", "scoring": "mixture", "top_m": 2, "kernel_size": {"block1": 3, "block2": 1}}),
    (cg.ClassMahalanobis, {"covariance": "full", "fusion": "gaussian"}),
    (cg.SimpleMahalanobis, {"covariance": "diag", "fusion": "max"}),
]


@pytest.mark.parametrize(("detector", "kwargs"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_guarded_model_equals_the_guard_in_torch(tiny_model, images, one_thread, detector, kwargs):
    guard = guard_for(tiny_model, images, detector, **kwargs)
    x = probe_images(images)
    logits, score, flagged = GuardedModel(guard.detector, threshold=guard.threshold_).eval()(x)
    ref = guard(x)
    assert torch.equal(logits, guard.detector.forward(x)[0])
    torch.testing.assert_close(score, ref.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(flagged, ref.flagged) and flagged.dtype == torch.bool
    assert score[16:].mean() > score[:16].mean()  # larger = more anomalous, as the detector
    with torch.no_grad():  # batch-size invariant
        torch.testing.assert_close(GuardedModel(guard.detector, threshold=guard.threshold_)(x[:3])[1], score[:3], rtol=1e-6, atol=1e-6)


def test_single_layer_score_is_the_raw_distance(tiny_model, images, one_thread):
    x, _ = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block2"], covariance="full", fit_positions=1.0).fit([x[:160]], progress=False)
    guarded = GuardedModel(det, threshold=1.0)
    maps = det.distance_maps(x[:4])["block2"]  # (4, H', W')
    torch.testing.assert_close(guarded(x[:4])[1], maps.mean((1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("detector", "kwargs"), CASES[:1] + CASES[3:4] + CASES[5:6] + CASES[6:], ids=lambda v: getattr(v, "__name__", str(v)))
def test_onnxruntime_equals_covguard(tiny_model, images, one_thread, tmp_path, detector, kwargs):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    guard = guard_for(tiny_model, images, detector, **kwargs)
    path = guard.export(tmp_path / "guarded.onnx")
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "score", "flagged"]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["covguard"])
    assert meta["threshold"] == guard.threshold_ and meta["layers"] == LAYERS and meta["input_shape"] == [1, 8, 8]
    x = probe_images(images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, x[:1]):  # dynamic batch axis
        logits, score, flagged = session.run(None, {"images": batch.numpy()})
        ref = guard(batch)
        torch.testing.assert_close(torch.from_numpy(logits), guard.detector.forward(batch)[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(score), ref.scores, rtol=1e-4, atol=1e-4)
        away = (ref.scores.double() - guard.threshold_).abs() > 1e-4 * ref.scores.double().abs().clamp_min(1)
        assert torch.equal(torch.from_numpy(flagged)[away], ref.flagged[away]) and flagged.dtype == bool


def test_torchscript_export(tiny_model, images, one_thread, tmp_path):
    guard = guard_for(tiny_model, images, cg.ClassMahalanobis, covariance="lowrank", rank=4)
    path = guard.export(tmp_path / "guarded.pt", format="torchscript")
    assert not tiny_model.training  # the classifier's mode is restored
    tiny_model.train()
    try:
        guard.export(tmp_path / "again.pt", format="torchscript")
        assert tiny_model.training
    finally:
        tiny_model.eval()
    loaded = torch.jit.load(str(path))
    x = probe_images(images)
    logits, score, flagged = loaded(x)
    ref = guard(x)
    torch.testing.assert_close(score, ref.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(flagged, ref.flagged)


def test_export_refuses_what_it_cannot_write(tiny_model, images, tmp_path):
    guard = guard_for(tiny_model, images)
    with pytest.raises(ValueError, match="format must be one of"):
        guard.export(tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match="not calibrated"):
        cg.Guard(tiny_model, guard.detector).export(tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="SimpleMahalanobis or ClassMahalanobis"):
        GuardedModel(object(), threshold=0.0)


def test_export_cli(tiny_model, images, one_thread, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    # a user's model file: the tests' TinyCNN
    (tmp_path / "net.py").write_text("from conftest import TinyCNN\n\ndef build(num_classes=3):\n    return TinyCNN(num_classes=num_classes)\n")
    save_file(tiny_model.state_dict(), str(tmp_path / "w.safetensors"))
    guard = guard_for(tiny_model, images, cg.ClassMahalanobis)
    guard.save(tmp_path / "guard.safetensors")
    argv = ["export", "--detector", str(tmp_path / "guard.safetensors"), "--model-file", f"{tmp_path / 'net.py'}:build",
            "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "g.onnx")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "input images (N, 1, 8, 8)" in out and "0 flags differ" in out
    assert main(argv) == 2 and "covguard export: error: --out" in capsys.readouterr().err
    assert main([*argv, "--force", "--format", "torchscript"]) == 0
    argv[2] = str(tmp_path / "missing.safetensors")
    assert main([*argv, "--force"]) == 2 and "--detector" in capsys.readouterr().err
