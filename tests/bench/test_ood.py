"""Reduced OOD benchmark on the real shared data (skipped when it is absent)."""

import pytest

from covguard.bench.ood import FAR, NEAR, SYNTHETIC, OODConfig, run_ood
from covguard.data.registry import data_root

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    root = data_root()
    needed = ["cifar10-jpeg/train.tar", "cifar100-jpeg.tar", "tiny-imagenet-200-val.tar", "mnist"]
    if root is None or not all((root / p).exists() for p in needed):
        pytest.skip("shared OOD data not found (set COVGUARD_DATA)")
    out = tmp_path_factory.mktemp("ood")
    cfg = OODConfig(models=("resnet20",), max_eval=150, n_noise=100, max_train=600, n_holdout=200,
                    baselines=("msp", "energy", "knn"), variants=True, n_criterion=100, progress=False)
    return run_ood(root, out, cfg), out


def test_report_covers_every_set_and_metric(reduced_run):
    results, out = reduced_run
    model = results["models"]["resnet20"]
    assert 0.75 < model["id_accuracy"] < 0.9
    assert set(model["metrics"]) == {*NEAR, *FAR, *SYNTHETIC}
    m = model["metrics"]["cifar100"]["class_mahalanobis_top1"]
    assert {"auroc", "fpr_at_95tpr", "fpr_at_95tpr_ood_positive", "aupr_in", "aupr_out"} <= set(m)
    assert results["n_images"]["mnist_jpeg"] == results["n_images"]["mnist"] == 150
    for name in (*NEAR, *FAR, *SYNTHETIC):
        assert (out / f"roc_{name}.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| method | cifar100 | tin | near | mnist | mnist_jpeg | far |" in table and "| knn |" in table


def test_noise_is_easy_for_patch_detectors(reduced_run):
    metrics = reduced_run[0]["models"]["resnet20"]["metrics"]
    for det in ("simple_mahalanobis", "class_mahalanobis_top1"):
        assert metrics["uniform_noise"][det]["auroc"] > 0.95


def test_variant_sweep_selects_by_held_out_likelihood_only(reduced_run):
    from covguard.bench.ood import OWN_FIT_VARIANTS, VARIANTS

    results, out = reduced_run
    variants = results["models"]["resnet20"]["variants"]
    assert set(variants) == set(VARIANTS) | set(OWN_FIT_VARIANTS)
    metrics = results["models"]["resnet20"]["metrics"]
    # The unchanged variants are the main detectors: the same numbers.
    assert variants["class-top1/full/mean"]["auroc"]["tin"] == metrics["tin"]["class_mahalanobis_top1"]["auroc"]
    for kind in ("simple", "class-top1"):
        forms = {n: v for n, v in variants.items() if n.startswith(kind + "/") and n.endswith("/mean")}
        chosen = [n for n, v in forms.items() if v.get("selected")]
        assert chosen == [max(forms, key=lambda n: forms[n]["holdout_log_likelihood"])]
    # A diagonal form ignores the correlations a full one models: lower held-out likelihood.
    assert variants["simple/full/mean"]["holdout_log_likelihood"] > variants["simple/diag/mean"]["holdout_log_likelihood"]
    assert "## Variant sweep" in (out / "results.md").read_text()
