"""The adversarial benchmark's markdown, rendered offline from a results dict (no data needed)."""

import re

from covguard.bench.adversarial import render_markdown

DETECTORS = ("class_mahalanobis_top1", "msp")
BUDGETS = ("1", "16", "2", "4", "8")  # as json.dump(sort_keys=True) writes them


def _results() -> dict:
    metrics = {"fgsm": {d: {"auroc": 0.9, "fpr_at_95tpr": 0.3} for d in DETECTORS}}
    sweep = {
        b: {"fgsm": {"success_rate": 0.5, "n_success": 10, "auroc": {d: float(b) / 100 for d in DETECTORS}}} for b in BUDGETS
    }
    model = {
        "test_accuracy": 0.8, "n_clean_correct": 20, "attack_success_rate": {"fgsm": 0.9, "mix": 0.9},
        "metrics": metrics, "layer_auroc": {"fgsm": {"class_mahalanobis_top1": {"layer1": 0.95}}}, "sweep": sweep,
    }
    config = {"attacks": ["fgsm"], "eps": 8 / 255, "eps_l2": 0.5, "n_images": 30, "seed": 0, "baselines": ["msp"]}
    return {"config": config, "models": {"resnet44": model}}


def test_budget_sweep_columns_are_in_numeric_order():
    text = render_markdown(_results())
    sweep = text[text.index("## AUROC against the L-inf budget") :]
    header = next(line for line in sweep.splitlines() if line.startswith("| detector |"))
    assert header == "| detector | 1 | 2 | 4 | 8 | 16 |"
    row = next(line for line in sweep.splitlines() if line.startswith("| msp |"))
    values = [float(v) for v in re.findall(r"\| ([\d.]+)", row)]
    assert values == [1.0, 2.0, 4.0, 8.0, 16.0]  # the cells moved with their headers


def test_a_checkpoint_where_no_attack_succeeded_renders():
    results = _results()
    results["models"]["resnet44"].pop("sweep")
    failed = {**results["models"]["resnet44"], "metrics": {}, "layer_auroc": {}}
    results["models"] = {"resnet20": failed, **results["models"]}  # the first checkpoint has nothing scored
    text = render_markdown(results)
    assert "| class_mahalanobis_top1 | 90.0 |" in text.replace(" ± 0.0", "")
    assert "| class_mahalanobis_top1 | layer1 | 95.0 |" in text
    results["models"] = {"resnet20": failed}
    text = render_markdown(results)
    assert "No attack succeeded on two or more images of any checkpoint" in text and "## AUROC" not in text
