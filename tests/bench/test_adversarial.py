"""Reduced adversarial benchmark on the real shared data (skipped when it is absent)."""

import json
from dataclasses import replace

import pytest

from covguard.bench.adversarial import AdversarialConfig, run_adversarial
from covguard.data.registry import data_root

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    root = data_root()
    if root is None or not (root / "cifar10-jpeg" / "train.tar").exists():
        pytest.skip("shared CIFAR-10 data not found (set COVGUARD_DATA)")
    out = tmp_path_factory.mktemp("adv")
    cfg = AdversarialConfig(
        models=("resnet20",), attacks=("fgsm", "pgd", "igm"), n_images=60, n_holdout=200, max_train=600,
        steps=3, igm_scales=2, baselines=("msp", "energy", "mds"), progress=False,
        sweep_eps=(1 / 255, 16 / 255), sweep_attacks=("fgsm", "pgd"),
    )
    return run_adversarial(root, out, cfg), out, cfg


def test_report_files_and_protocol(reduced_run):
    results, out, _ = reduced_run
    model = results["models"]["resnet20"]
    assert 0.75 < model["test_accuracy"] < 0.9  # README of the data: 81.0 % on the JPEG test set
    assert model["n_fit"] == 600 and model["n_holdout"] == 200
    assert set(model["metrics"]) == {"fgsm", "pgd", "igm", "mix"}
    assert model["attack_success_rate"]["pgd"] > 0.9  # 8/255 breaks an undefended ResNet-20
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["resnet20"]["metrics"]["pgd"]["msp"]["auroc"] == model["metrics"]["pgd"]["msp"]["auroc"]
    for attack in ("fgsm", "pgd", "igm", "mix"):
        assert (out / f"roc_{attack}.png").stat().st_size > 0 and (out / f"hist_{attack}.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| class_mahalanobis_top1 |" in table and "| mds |" in table


def test_patch_detectors_beat_chance_and_confidence_baselines_fail_on_pgd(reduced_run):
    model = reduced_run[0]["models"]["resnet20"]
    pgd = model["metrics"]["pgd"]
    assert pgd["simple_mahalanobis"]["auroc"] > 0.7
    assert pgd["msp"]["auroc"] < 0.5  # PGD raises confidence: logit scores fall below chance
    assert set(model["layer_auroc"]["pgd"]["simple_mahalanobis"]) == {"layer1", "layer2", "layer3", "avgpool"}


def test_bad_eps_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="eps must be > 0"):
        run_adversarial(tmp_path, tmp_path / "out", AdversarialConfig(eps=0.0))


def test_cli_refuses_missing_data_root(monkeypatch):
    from covguard.cli import main

    monkeypatch.delenv("COVGUARD_DATA", raising=False)
    with pytest.raises(SystemExit, match="--data must be a folder"):
        main(["bench", "adversarial", "--data", "/nonexistent/covguard-data"])


def test_budget_sweep_rises_with_eps_and_is_tabled(reduced_run):
    results, out, _ = reduced_run
    sweep = results["models"]["resnet20"]["sweep"]
    assert list(sweep) == ["1", "16"] and set(sweep["1"]) == {"fgsm", "pgd"}
    for attack in ("fgsm", "pgd"):
        assert sweep["16"][attack]["success_rate"] > sweep["1"][attack]["success_rate"]
    # 16/255 PGD moves features far more than 1/255 PGD: the patch detector sees it better.
    assert sweep["16"]["pgd"]["auroc"]["simple_mahalanobis"] > sweep["1"]["pgd"]["auroc"]["simple_mahalanobis"]
    table = (out / "results.md").read_text()
    assert "## AUROC against the L-inf budget" in table and "### pgd" in table and "| attack success |" in table


def test_resume_keeps_finished_checkpoints_and_refuses_other_settings(reduced_run):
    results, out, cfg = reduced_run
    (out / "results.md").write_text("stale")
    again = run_adversarial(data_root(), out, cfg, resume=True)
    assert (out / "results.md").read_text().startswith("# Adversarial detection")  # nothing ran: re-rendered
    assert again["models"]["resnet20"]["seconds"] == results["models"]["resnet20"]["seconds"]  # not rerun
    with pytest.raises(ValueError, match="other settings \\(n_images\\)"):
        run_adversarial(data_root(), out, replace(cfg, n_images=61), resume=True)
