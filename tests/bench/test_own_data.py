"""``bench ood`` / ``bench adversarial`` on your own model and sets: tiny end-to-end runs through the CLI, and
one-line errors naming each bad option (exit status 2)."""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from covguard.cli import main
from covguard.models import SmallCNN

MODEL_ARGS = ["--model-arg", "in_channels=3", "--model-arg", "width=4", "--model-arg", "num_classes=2"]
COLOURS = {"a": (200, 40, 40), "b": (40, 40, 200)}


def _write_class_images(root, n, sizes, rng):
    for cls, colour in COLOURS.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            pixels = np.clip(np.array(colour) + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """ID train folder, ID test tar (images of mixed sizes), a flat OOD folder of noise, and SmallCNN weights."""
    base = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    _write_class_images(base / "train", 16, [(20, 24), (16, 16)], rng)
    _write_class_images(base / "test_dir", 8, [(32, 20)], rng)
    with tarfile.open(base / "test.tar", "w") as tar:
        tar.add(base / "test_dir", arcname="test")
    (base / "ood").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(base / "ood" / f"n{i}.png")
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, width=4, num_classes=2)
    colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255  # (2, 3)
    x = colours.repeat(8, 1)[:, :, None, None] + 0.1 * torch.randn(16, 3, 16, 16)  # (16, 3, 16, 16)
    y = torch.tensor([0, 1]).repeat(8)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.clamp(0, 1)), y).backward()
        opt.step()
    save_file(model.state_dict(), str(base / "small.safetensors"))
    return base


def _ood_args(sets, out, *extra):
    return ["bench", "ood", "--checkpoint", f"small_cnn={sets / 'small.safetensors'}", *MODEL_ARGS,
            "--id-train", str(sets / "train"), "--id-test", str(sets / "test.tar"), "--ood", f"noise={sets / 'ood'}",
            "--image-size", "16", "--n-holdout", "6", "--n-noise", "10", "--baselines", "msp", "energy", "mds", "react",
            "--no-progress", "--out", str(out), *extra]


def test_bench_ood_on_own_model_and_sets(sets, tmp_path, one_thread):
    assert main(_ood_args(sets, tmp_path / "out")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["n_images"] == {"id_test": 16, "noise": 12, "uniform_noise": 10, "gaussian_noise": 10, "blank": 10}
    assert results["groups"] == {"ood": ["noise"]} and results["config"]["models"] == ["small_cnn"]
    model = results["models"]["small_cnn"]
    assert model["n_fit"] == 32 - 6 and model["n_holdout"] == 6
    metrics = model["metrics"]
    assert set(metrics) == {"noise", "uniform_noise", "gaussian_noise", "blank"}
    # The SmallCNN's feature_layers are tapped; its fc is found for ReAct; avgpool feeds MDS and the penultimate detector.
    assert {"react", "mds", "class_penultimate_original", "class_mahalanobis_top1"} <= set(metrics["noise"])
    assert set(model["layer_auroc"]["noise"]["simple_mahalanobis"]) == {"block1", "block2", "block3", "avgpool"}
    assert metrics["noise"]["simple_mahalanobis"]["auroc"] > 0.9  # uniform colours vs noise: far apart
    md = (tmp_path / "out" / "results.md").read_text()
    assert "# OOD detection on own data" in md and "| method | noise | ood | uniform_noise | gaussian_noise | blank |" in md
    assert (tmp_path / "out" / "roc_noise.png").stat().st_size > 0


def test_bench_adversarial_on_own_model_and_sets(sets, tmp_path, one_thread):
    args = ["bench", "adversarial", "--checkpoint", f"small_cnn={sets / 'small.safetensors'}", *MODEL_ARGS,
            "--id-train", str(sets / "train"), "--id-test", str(sets / "test_dir"), "--image-size", "16",
            "--attacks", "fgsm", "pgd", "--eps", "200", "--steps", "5", "--n-images", "16", "--n-holdout", "6",
            "--baselines", "msp", "--no-progress", "--out", str(tmp_path / "adv")]
    assert main(args) == 0
    results = json.loads((tmp_path / "adv" / "results.json").read_text())
    model = results["models"]["small_cnn"]
    assert model["n_drawn"] == 16 and results["own_sets"]["image_size"] == 16
    assert "pgd" in model["metrics"] and "msp" in model["metrics"]["pgd"]
    assert "# Adversarial detection on own data" in (tmp_path / "adv" / "results.md").read_text()


def test_model_file_without_feature_layers_needs_layers_and_skips_penultimate_baselines(sets, tmp_path, capsys, one_thread):
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
    )
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    base = ["bench", "ood", "--checkpoint", f"mine={tmp_path / 'net.safetensors'}", "--model-file", f"{tmp_path / 'net.py'}:build",
            "--id-train", str(sets / "train"), "--id-test", str(sets / "test.tar"), "--ood", f"noise={sets / 'ood'}",
            "--image-size", "16", "--n-holdout", "6", "--n-noise", "10", "--baselines", "msp", "mds", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "--layers is required" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"baselines \['mds'\] skipped: name the layer with --feature-layer"):
        assert main([*base, "--layers", "1", "3", "--out", str(tmp_path / "b")]) == 0
    metrics = json.loads((tmp_path / "b" / "results.json").read_text())["models"]["mine"]["metrics"]["noise"]
    assert "msp" in metrics and "mds" not in metrics
    assert main([*base, "--layers", "1", "3", "4", "--feature-layer", "4", "--out", str(tmp_path / "c")]) == 0
    metrics = json.loads((tmp_path / "c" / "results.json").read_text())["models"]["mine"]["metrics"]["noise"]
    assert "mds" in metrics and "class_penultimate_original" in metrics


def _bad_inputs(tmp_path, sets):
    (tmp_path / "empty").mkdir()
    (tmp_path / "holey" / "a").mkdir(parents=True)
    (tmp_path / "holey" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "holey" / "a" / "x.png")
    (tmp_path / "other" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "c" / "x.png")
    return {"empty": tmp_path / "empty", "holey": tmp_path / "holey", "other": tmp_path / "other"}


BAD = [
    (["--models", "resnet20"], "--checkpoint replaces --models"),
    (["--checkpoint", "small_cnn"], "--checkpoint must be NAME=PATH"),
    (["--checkpoint", "bogus={W}"], "--checkpoint bogus="),
    (["--checkpoint", "small_cnn={T}/missing.safetensors"], "--checkpoint small_cnn="),
    (["--checkpoint", "small_cnn={W}", "--checkpoint", "small_cnn={W}"], "--checkpoint: the name 'small_cnn' is given twice"),
    (["--id-test", "DROP"], "--id-test is required"),
    (["--id-train", "{T}/missing"], "--id-train"),
    (["--id-train", "{empty}"], "--id-train"),
    (["--id-train", "{holey}"], "class folders ['b'] hold no images"),
    (["--id-test", "{other}"], "--id-test class folders ['c'] differ"),
    (["--ood", "noise={empty}"], "--ood noise="),
    (["--ood", "DROP"], "--ood NAME=PATH is required"),
    (["--ood", "uniform_noise={S}/ood"], "--ood: the names ['uniform_noise']"),
    (["--layers", "nowhere"], "--layers"),
    (["--feature-layer", "nowhere"], "--feature-layer 'nowhere'"),
    (["--fc-layer", "block1"], "--fc-layer 'block1' must name an nn.Linear"),
    (["--model-arg", "width=8"], "--checkpoint small_cnn="),  # weights of another shape
    (["--protocol", "validation"], "--protocol validation"),
    (["--image-size", "2"], "--image-size must be in [8, 1024]"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_option_is_one_line_naming_it(sets, tmp_path, capsys, change, message, one_thread):
    paths = {"W": sets / "small.safetensors", "T": tmp_path, "S": sets, **_bad_inputs(tmp_path, sets)}
    args = _ood_args(sets, tmp_path / "out")
    option = change[0]
    if change[1] == "DROP":  # leave the option out
        i = args.index(option)
        del args[i : i + 2]
    elif option in ("--checkpoint", "--id-train", "--id-test", "--ood", "--image-size") and option in args:
        i = args.index(option)  # replace the good value
        args[i + 1] = change[1].format(**paths)
        args[i + 2 : i + 2] = [c.format(**paths) for c in change[2:]]
    else:
        args += [c.format(**paths) for c in change]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_new_options_need_their_partners(tmp_path, capsys):
    assert main(["bench", "adversarial", "--layers", "block1", "--data", str(tmp_path)]) == 2
    assert "--layers describes the model of --checkpoint" in capsys.readouterr().err
    assert main(["bench", "ood", "--image-size", "64", "--data", str(tmp_path)]) == 2
    assert "--image-size resizes the images of --id-train" in capsys.readouterr().err
