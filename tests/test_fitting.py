"""``covguard fit``: image folders and tars -> a calibrated guard; every bad input is one line, exit 2."""

import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import covguard as cg
from covguard.cli import main
from covguard.data.training_images import read_training_images
from covguard.fitting import FitConfig, fit_guard, split_calibration
from covguard.guard import Calibration, decode_image
from covguard.models import MODELS

pytestmark = pytest.mark.filterwarnings("ignore:calibrating on:UserWarning")

MODEL = ["--model", "small_cnn", "--model-arg", "width=4", "--model-arg", "num_classes=3"]
CLASSES = ("a_round", "b_bar", "c_noise")  # sorted: labels 0, 1, 2


def picture(kind: int, rng: np.random.Generator, size=(16, 16)) -> np.ndarray:
    """(H, W) uint8: a blob, a bar or noise, with pixel noise."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if kind == 0:
        base = np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05)
    elif kind == 1:
        base = (np.abs(xx - rng.uniform(0.3, 0.7)) < 0.12).astype(float)
    else:
        base = rng.uniform(0, 1, size)
    return np.clip(200 * base + rng.uniform(0, 40, size), 0, 255).astype(np.uint8)


def write_folder(root, n_per_class=30, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            size = (sizes or {}).get((k, i), (16, 16))
            Image.fromarray(picture(k, rng, size), "L").save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    model = MODELS["small_cnn"](width=4, num_classes=3).eval()
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    write_folder(root / "train")
    with tarfile.open(root / "train.tar.gz", "w:gz") as archive:
        archive.add(root / "train", arcname="data/train")
    return root, model


def fit_args(root, train, out, *extra):
    return ["fit", *MODEL, "--weights", str(root / "weights.safetensors"), "--train", str(train), "--out", str(out),
            "--no-progress", "--calibration-fraction", "0.2", *extra]


def test_fit_writes_a_calibrated_guard_from_held_out_images_only(setup, tmp_path, capsys):
    root, model = setup
    out = tmp_path / "guard.safetensors"
    assert main(fit_args(root, root / "train", out, "--tpr", "0.9")) == 0
    summary = capsys.readouterr().out
    assert "fitted on 72 images, calibrated on 18 held out (1x16x16, 3 classes)" in summary
    assert "layers: block1, block2, block3" in summary and "fit time:" in summary and "threshold:" in summary
    guard = cg.load_guard(out, model)
    assert isinstance(guard.detector, cg.ClassMahalanobis) and guard.detector.layers == ("block1", "block2", "block3")
    # independent recomputation: seeded split, statistics from the fit part, standardization and threshold from the rest
    data = read_training_images(root / "train", channels=1, labeled=True, progress=False)
    fit_idx, cal_idx = split_calibration(len(data), 0.2, seed=0)
    assert len(set(fit_idx.tolist()) | set(cal_idx.tolist())) == 90 and not set(fit_idx.tolist()) & set(cal_idx.tolist())
    assert guard.detector.fusion == "gaussian"  # the deploy default: two-sided
    assert (guard.detector.covariance, guard.detector.rank, guard.detector.fit_positions) == ("lowrank", 32, 0.05)  # the library's
    ref = cg.ClassMahalanobis(model, layers=["block1", "block2", "block3"], fusion="gaussian")
    batches = [fit_idx[i : i + FitConfig().batch_size] for i in range(0, len(fit_idx), FitConfig().batch_size)]  # the CLI's: same draws
    ref.fit([(data.float(b), data.labels[b]) for b in batches], holdout=[data.float(cal_idx)], progress=False)
    for layer in ref.layers:
        torch.testing.assert_close(guard.detector.forms_[layer].mean, ref.forms_[layer].mean)
    layer_scores = ref.layer_scores(data.float(cal_idx))  # (N, L) float64
    torch.testing.assert_close(guard.detector.score_mean_, layer_scores.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(guard.detector.score_std_, layer_scores.std(0), rtol=1e-5, atol=1e-6)
    correlation = guard.detector.fusion_state()["correlation"]
    torch.testing.assert_close(correlation, torch.corrcoef(layer_scores.T), rtol=1e-5, atol=1e-6)
    expected = Calibration.from_scores(ref.score(data.float(cal_idx)), 0.9)
    assert guard.calibration_.n == 18 and guard.calibration_.threshold == pytest.approx(expected.threshold, rel=1e-5)


def test_tar_gives_the_same_guard_and_simple_needs_no_labels(setup, tmp_path, capsys):
    root, model = setup
    assert main(fit_args(root, root / "train", tmp_path / "a.safetensors", "--detector", "simple", "--layers", "block2")) == 0
    assert main(fit_args(root, root / "train.tar.gz", tmp_path / "b.safetensors", "--detector", "simple", "--layers", "block2")) == 0
    a, b = cg.load_guard(tmp_path / "a.safetensors", model), cg.load_guard(tmp_path / "b.safetensors", model)
    assert isinstance(a.detector, cg.SimpleMahalanobis)
    torch.testing.assert_close(a.detector.forms_["block2"].proj, b.detector.forms_["block2"].proj)
    assert a.threshold_ == b.threshold_
    loose = tmp_path / "loose"  # unlabeled: files at any depth
    loose.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray(picture(i % 3, rng), "L").save(loose / f"{i}.png")
    assert main(fit_args(root, loose, tmp_path / "c.safetensors", "--detector", "simple")) == 0
    assert "fitted on 16 images, calibrated on 4 held out (1x16x16, unlabeled)" in capsys.readouterr().out
    assert main(fit_args(root, root / "train.tar.gz", tmp_path / "d.safetensors")) == 0  # labeled tar: prefix data/train


def test_fit_images_decode_as_covguard_score_does(setup, tmp_path):
    folder = write_folder(tmp_path / "mixed", n_per_class=4, sizes={(1, 2): (20, 24)})
    Image.open(folder / "b_bar" / "001.png").convert("RGB").save(folder / "b_bar" / "001.png")  # an RGB file
    with pytest.warns(UserWarning, match=r"1 of 12 images are not 16x16 \(sizes found: 16x16, 20x24\).*resized"):
        data = read_training_images(folder, channels=1, labeled=True, progress=False)
    assert data.resized == 1 and data.classes == CLASSES and data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i, name in enumerate(data.names):
        expected = decode_image((folder / name).read_bytes(), channels=1, size=(16, 16))
        assert torch.equal(data.float(torch.tensor([i]))[0], expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a size asked for: no warning
        rgb = read_training_images(folder, channels=3, labeled=False, image_size=(8, 10), progress=False)
    assert rgb.images.shape == (12, 3, 8, 10) and rgb.labels is None


def test_split_is_seeded():
    a, b = split_calibration(100, 0.1, seed=3), split_calibration(100, 0.1, seed=3)
    assert torch.equal(a[1], b[1]) and len(a[1]) == 10 and len(a[0]) == 90
    assert not torch.equal(a[1], split_calibration(100, 0.1, seed=4)[1])


def error_of(capsys, argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("covguard fit: error: "), err
    return err[0]


def test_bad_input_is_one_line_naming_it(setup, tmp_path, capsys):
    root, _ = setup
    out = tmp_path / "g.safetensors"
    assert "does not exist" in error_of(capsys, fit_args(root, tmp_path / "nowhere", out))
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in error_of(capsys, fit_args(root, tmp_path / "empty", out))
    bad = write_folder(tmp_path / "bad", n_per_class=3)
    (bad / "d_empty").mkdir()
    assert "class folders ['d_empty'] hold no images" in error_of(capsys, fit_args(root, bad, out))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        Image.fromarray(picture(0, np.random.default_rng(i)), "L").save(flat / f"{i}.png")
    assert "--detector class needs labeled images" in error_of(capsys, fit_args(root, flat, out))
    two = write_folder(tmp_path / "two", n_per_class=3)
    for f in (two / "c_noise").iterdir():
        f.unlink()
    (two / "c_noise").rmdir()
    line = error_of(capsys, fit_args(root, two, out))
    assert "has 2 class folders" in line and "the model has 3 outputs" in line
    for fraction in ("0", "1", "1.5"):
        line = error_of(capsys, [*fit_args(root, root / "train", out), "--calibration-fraction", fraction])
        assert "--calibration-fraction must be in (0, 1)" in line
    assert "--tpr must be in (0, 1]" in error_of(capsys, [*fit_args(root, root / "train", out), "--tpr", "0"])
    assert "holds out 1" in error_of(capsys, [*fit_args(root, bad, out, "--detector", "simple"), "--calibration-fraction", "0.1"])
    out.write_bytes(b"keep me")
    assert "--out" in error_of(capsys, fit_args(root, root / "train", out)) and out.read_bytes() == b"keep me"
    assert main([*fit_args(root, root / "train", out), "--force"]) == 0 and out.read_bytes() != b"keep me"
    capsys.readouterr()
    new = tmp_path / "new.safetensors"
    line = error_of(capsys, fit_args(root, root / "train", new, "--layers", "nope"))
    assert "layers ['nope'] are not modules" in line and not new.exists()
    torch.manual_seed(0)
    save_file(MODELS["small_cnn"](width=8, num_classes=3).state_dict(), str(tmp_path / "wide.safetensors"))
    argv = fit_args(root, root / "train", new)
    argv[argv.index("--weights") + 1] = str(tmp_path / "wide.safetensors")
    assert "--weights: checkpoint" in error_of(capsys, argv) and not new.exists()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_unreadable_files_are_skipped_with_one_warning(tmp_path):
    folder = write_folder(tmp_path / "broken", n_per_class=3)
    (folder / "a_round" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="skipped 1 of 10 files that cannot be decoded"):
        data = read_training_images(folder, channels=1, labeled=True, progress=False)
    assert len(data) == 9 and data.skipped == 1


def test_fit_guard_checks_labels_and_config(setup):
    root, model = setup
    data = read_training_images(root / "train", channels=1, labeled=False, progress=False)
    with pytest.raises(ValueError, match="--detector class needs labeled images"):
        fit_guard(model, data, FitConfig(progress=False))
    with pytest.raises(ValueError, match="--detector must be one of"):
        FitConfig(detector="knn")
