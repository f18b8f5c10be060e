"""The worked example of docs/your-model.md, step by step, on the embedded digits written as PNG folders:
a user's own CNN trained on a folder, ``covguard fit``, ``covguard score``, ``covguard export``, onnxruntime."""

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import covguard as cg
from covguard.cli import main
from covguard.data.training_images import read_training_images
from covguard.models.user import load_model_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "your_model"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("your_model")
    load_script("make_digits").write_digits(root / "digits")
    load_script("train").train(root / "digits" / "train", root / "mynet.pt", epochs=8)
    return root


@pytest.mark.filterwarnings("ignore:calibrating on:UserWarning")
def test_fit_score_export_run(workdir, capsys):
    root = workdir
    model_args = ["--model-file", f"{EXAMPLE / 'mynet.py'}:build", "--weights", str(root / "mynet.pt")]
    guard_file = root / "guard.safetensors"
    assert main(["fit", *model_args, "--train", str(root / "digits" / "train"), "--layers", "stage1", "stage2", "stage3",
                 "--out", str(guard_file), "--no-progress"]) == 0
    assert "fitted on 1293 images, calibrated on 144 held out (1x16x16, 10 classes)" in capsys.readouterr().out

    for name in ("test", "odd"):
        assert main(["score", "--detector", str(guard_file), *model_args, "--images", str(root / "digits" / name),
                     "--out", str(root / f"{name}.csv"), "--no-progress"]) == 0
    test, odd = read_csv(root / "test.csv"), read_csv(root / "odd.csv")
    assert len(test) == len(odd) == 360
    accuracy = np.mean([int(r["predicted_class"]) == int(r["path"].split("/")[0]) for r in test])
    flagged_test = np.mean([r["flagged"] == "True" for r in test])
    flagged_odd = np.mean([r["flagged"] == "True" for r in odd])
    assert accuracy > 0.9 and flagged_test < 0.15 and flagged_odd > 0.9, (accuracy, flagged_test, flagged_odd)

    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    onnx_file = root / "guarded.onnx"
    assert main(["export", "--detector", str(guard_file), *model_args, "--format", "onnx", "--out", str(onnx_file)]) == 0
    assert "0 flags differ" in capsys.readouterr().out

    # onnxruntime on the real images, read as the doc shows, against covguard's own guard
    model = load_model_file(f"{EXAMPLE / 'mynet.py'}:build")
    model.load_state_dict(torch.load(root / "mynet.pt", weights_only=True))
    guard = cg.load_guard(guard_file, model.eval())
    x = torch.cat([read_training_images(root / "digits" / name, channels=1, labeled=False, progress=False).float()
                   for name in ("test", "odd")])  # (720, 1, 16, 16)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits, score, flagged = session.run(None, {"images": x.numpy()})
    ref = guard(x)
    rel = (torch.from_numpy(score).double() - ref.scores.double()).abs() / ref.scores.double().abs().clamp_min(1)
    assert rel.max() < 1e-4, rel.max()
    assert np.array_equal(logits.argmax(1), ref.predictions.numpy())
    away = (ref.scores.double() - guard.threshold_).abs() > 1e-4 * ref.scores.double().abs().clamp_min(1)
    assert np.array_equal(flagged[away.numpy()], ref.flagged.numpy()[away.numpy()])
    csv_scores = np.array([float(r["score"]) for r in test + odd])
    np.testing.assert_allclose(score, csv_scores, rtol=1e-4, atol=1e-4)  # the exported graph agrees with covguard score
    print(f"onnxruntime vs covguard on 720 digit images: max relative score difference {rel.max():.2e}")
