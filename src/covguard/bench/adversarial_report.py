"""Markdown report of the adversarial benchmark (:mod:`covguard.bench.adversarial`), from its results dict."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from covguard.bench.common import CIFAR_LAYERS, format_mean_std, mean_std, weights_description
from covguard.bench.validation import protocols_of, selection_markdown, table_suffix
from covguard.report import markdown_table

__all__ = ["HEADLINE", "render_markdown"]

#: Detector shown first in tables: fixed before any adversarial data was scored.
HEADLINE = "class_mahalanobis_top1"


def _table(results: dict, key: str, detectors: Sequence[str], attacks: Sequence[str], get: Callable = lambda m: m["metrics"]) -> str:
    models = [get(m) for m in results["models"].values()]
    rows = []
    for det in detectors:
        row = {"detector": det}
        for attack in attacks:
            vals = [m[attack][det][key] for m in models if attack in m]
            row[attack] = format_mean_std(vals) if vals else None
        rows.append(row)
    return markdown_table(rows, ["detector", *attacks])


def render_markdown(results: dict) -> str:
    """Tables: AUROC and FPR@95 (mean ± std over checkpoints, %), per-layer AUROC, success rates;
    per protocol run (fixed, validation), a fixed-only report keeping its headings unchanged."""
    models = results["models"]
    first = next(iter(models.values()))
    cfg = results["config"]
    protocols = protocols_of(cfg)
    main = (lambda m: m["metrics"]) if "fixed" in protocols else (lambda m: m["validation"]["metrics"])
    attacks = [a for a in [*cfg["attacks"], "mix"] if any(a in main(m) for m in models.values())]
    # Ours first (headline leading), then the baselines in the configured order (JSON sorts keys).
    order = [HEADLINE, "class_mahalanobis", "class_mahalanobis_mixture", "simple_mahalanobis", "class_penultimate_original",
             *cfg["baselines"]]
    found = list(dict.fromkeys(d for m in models.values() for per in main(m).values() for d in per))
    detectors = [d for d in order if d in found] + sorted(set(found) - set(order))
    own = results.get("own_sets")
    lines = [
        "# Adversarial detection on CIFAR-10 (JPEG copy)" if own is None else
        f"# Adversarial detection on own data: {own['id_test']} (fitted on {own['id_train']}), images resized to {own['image_size']}",
        "",
        f"Checkpoints: {', '.join(models)} ({results.get('weights') or weights_description(cfg)}); L-inf eps = {cfg['eps'] * 255:.0f}/255, L2 eps = {cfg['eps_l2']}; "
        f"{cfg['n_images']} test images drawn (seed {cfg['seed']}), the correctly classified ones attacked. "
        "Values are mean ± std over checkpoints, in %.",
        "",
        "## Models",
        "",
        markdown_table(
            [
                {
                    "model": name,
                    "JPEG test accuracy": f"{m['test_accuracy'] * 100:.2f}",
                    "attacked images": m["n_clean_correct"],
                    **{f"success {a}": f"{m['attack_success_rate'][a] * 100:.1f}" for a in attacks},
                }
                for name, m in models.items()
            ],
            ["model", "JPEG test accuracy", "attacked images", *[f"success {a}" for a in attacks]],
        ),
        "",
    ]
    if not attacks:
        lines += ["No attack succeeded on two or more images of any checkpoint: there is nothing to detect.", ""]
        return "\n".join(lines)
    if "fixed" in protocols:
        lines += _protocol_tables(results, detectors, attacks, lambda m: m["metrics"], table_suffix(protocols, "fixed"))
        rows = []
        layer_auroc = next(m["layer_auroc"][attacks[0]] for m in models.values() if attacks[0] in m["layer_auroc"])
        for det in [d for d in detectors if d in layer_auroc]:
            layers = layer_auroc[det]
            for layer in sorted(layers, key=lambda k: (CIFAR_LAYERS.index(k) if k in CIFAR_LAYERS else len(CIFAR_LAYERS), k)):
                row = {"detector": det, "layer": layer}
                for attack in attacks:
                    vals = [m["layer_auroc"][attack][det][layer] for m in models.values() if attack in m["layer_auroc"]]
                    row[attack] = format_mean_std(vals)
                rows.append(row)
        lines += [f"## Per-layer AUROC of the patch detectors{table_suffix(protocols, 'fixed')}", "",
                  markdown_table(rows, ["detector", "layer", *attacks]), ""]
        lines += _best_line(models, detectors, attacks, lambda m: m["metrics"])
        lines += _sweep_markdown({n: m.get("sweep") for n, m in models.items()}, detectors, table_suffix(protocols, "fixed"))
    if "validation" in protocols:
        lines += selection_markdown(results)
        detectors = [d for d in order if d in first["validation"]["selection"]]
        get = lambda m: m["validation"]["metrics"]  # noqa: E731
        lines += _protocol_tables(results, detectors, attacks, get, table_suffix(protocols, "validation"))
        lines += _best_line(models, detectors, attacks, get)
        sweeps = {n: m["validation"].get("sweep") for n, m in models.items()}
        lines += _sweep_markdown(sweeps, detectors, table_suffix(protocols, "validation"))
    return "\n".join(lines)


def _protocol_tables(results: dict, detectors: Sequence[str], attacks: Sequence[str], get: Callable, suffix: str) -> list[str]:
    return [
        f"## AUROC (higher is better){suffix}", "", _table(results, "auroc", detectors, attacks, get), "",
        f"## FPR at 95% TPR (lower is better){suffix}", "", _table(results, "fpr_at_95tpr", detectors, attacks, get), "",
    ]


def _best_line(models: dict, detectors: Sequence[str], attacks: Sequence[str], get: Callable) -> list[str]:
    mean_auroc = {
        det: mean_std([get(m)[a][det]["auroc"] for m in models.values() for a in attacks if a in get(m)])[0] for det in detectors
    }
    best = max(mean_auroc, key=mean_auroc.get)
    return [f"Highest AUROC averaged over attacks and checkpoints: {best} ({mean_auroc[best] * 100:.1f}).", ""]


def _sweep_markdown(sweeps: dict, detectors: Sequence[str], suffix: str) -> list[str]:
    """One AUROC table per swept attack: detectors x L-inf budgets (mean ± std over swept checkpoints)."""
    swept = {name: sweep for name, sweep in sweeps.items() if sweep}
    if not swept:
        return []
    budgets = sorted({b for s in swept.values() for b in s}, key=float)  # JSON keys are strings: "16" < "2"
    attacks = list(next(iter(swept.values()))[budgets[0]])
    lines = [
        f"## AUROC against the L-inf budget{suffix}",
        "",
        f"Checkpoints: {', '.join(swept)}; the same clean images attacked at each budget (eps in /255), "
        "scored by the same fitted detectors.",
        "",
    ]
    for attack in attacks:
        entries = {b: [s[b][attack] for s in swept.values() if b in s] for b in budgets}
        rows = [{"detector": "attack success", **{b: format_mean_std([e["success_rate"] for e in entries[b]]) for b in budgets}}]
        for det in detectors:
            row = {"detector": det}
            for b in budgets:
                vals = [e["auroc"][det] for e in entries[b] if det in e["auroc"]]
                row[b] = format_mean_std(vals) if vals else None
            rows.append(row)
        lines += [f"### {attack}", "", markdown_table(rows, ["detector", *budgets]), ""]
    return lines
