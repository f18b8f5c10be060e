"""The embedded demo end to end, at reduced size, through the command line."""

import json

import pytest

from covguard.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--out", str(out), "--epochs", "8", "--max-test", "150", "--no-progress"])
    return code, out


def test_demo_writes_report(demo_run, capsys):
    code, out = demo_run
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    sets = {"photo_crops", "uniform_noise", "gaussian_noise", "inverted_digits", "fgsm", "pgd"}
    assert set(result["metrics"]) == sets
    for name in sets:
        assert (out / f"roc_{name}.png").stat().st_size > 0
        assert (out / f"hist_{name}.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| simple_mahalanobis |" in table and "| msp |" in table and "| energy |" in table
    assert result["test_accuracy"] > 0.9


def test_demo_detectors_beat_chance_on_easy_shifts(demo_run):
    _, out = demo_run
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    for det in ("simple_mahalanobis", "class_mahalanobis_top1", "class_mahalanobis_mixture"):
        for name in ("uniform_noise", "gaussian_noise", "inverted_digits"):
            assert metrics[name][det]["auroc"] > 0.9, (det, name, metrics[name][det])
        assert metrics["pgd"][det]["auroc"] > 0.6, (det, metrics["pgd"][det])
