"""The suite's report: the detectors x categories table (AUROC and detection rate at 5 % FPR,
mean and worst over categories), the heatmap figures, ``results.md``, ``results.json`` and
``report.html``.

Across checkpoints: a CIFAR category's value is the mean over the CIFAR-10 checkpoints; the
shortcut categories come from the shortcut model alone. The mean and the worst category of a
detector are taken over those per-category values, every category weighing the same.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from covguard.bench.common import weights_description
from covguard.bench.suite_config import HEADLINE, OURS
from covguard.bench.suite_metrics import summarize
from covguard.html_report import add_html_report
from covguard.report import markdown_table, new_figure, write_json

__all__ = ["detector_order", "overall", "plot_heatmap", "render_markdown", "write_report"]

_FUSED_COLOUR, _OURS_COLOUR = "#6a1b9a", "#1f4e9a"
_KEYS = {"auroc": "auroc", "detection": "detection_at_5fpr"}


def detector_order(found: Sequence[str], baselines: Sequence[str]) -> list[str]:
    """Headline fused first, the other fused, ours, the baselines in configured order, then the rest."""
    fused = [d for d in found if d.startswith("fused_")]
    order = [HEADLINE, *fused, *OURS, *baselines]
    head = [d for d in dict.fromkeys(order) if d in found]
    return head + sorted(set(found) - set(head))


def _sources(results: Mapping) -> list[Mapping]:
    """Every checkpoint's results, the shortcut model's last."""
    return [*results["models"].values(), *([results["shortcut"]] if results.get("shortcut") else [])]


def overall(results: Mapping) -> dict:
    """Per detector and category: mean (and std) over the checkpoints that scored it; mean and worst.

    Returns
    -------
    dict
        ``{"categories": [...], "detectors": [...], "table": {detector: {"auroc": {cat: mean},
        "auroc_std": {...}, "detection": {...}, "detection_std": {...}, "summary_auroc": summarize(...),
        "summary_detection": ...}}}``.
    """
    sources = _sources(results)
    categories = [c for c in results["categories"] if any(c in s["metrics"] for s in sources)]
    found = list(dict.fromkeys(d for s in sources for m in s["metrics"].values() for d in m))
    detectors = detector_order(found, results["config"]["baselines"])
    table = {}
    for det in detectors:
        row: dict = {}
        for kind, key in _KEYS.items():
            means, stds = {}, {}
            for cat in categories:
                vals = [s["metrics"][cat][det][key] for s in sources if det in s["metrics"].get(cat, {})]
                means[cat] = statistics.fmean(vals) if vals else None
                stds[cat] = statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None
            row[kind], row[f"{kind}_std"], row[f"summary_{kind}"] = means, stds, summarize(means)
        table[det] = row
    return {"categories": categories, "detectors": detectors, "table": table}


def _label(det: str) -> str:
    if det == HEADLINE:
        return f"{det} (headline, fixed in advance)"
    return f"{det} (ours)" if det in OURS else det


def plot_heatmap(summary: Mapping, path: str | Path, *, kind: str = "auroc", title: str = "") -> Path:
    """Detectors (rows) x categories (columns) heatmap with the value in every cell, then the mean
    and the worst category; fused detectors' labels bold purple, ours bold blue.

    Parameters
    ----------
    summary : mapping
        :func:`overall`'s output.
    path : str or Path
        PNG to write.
    kind : {"auroc", "detection"}
    title : str
    """
    cats, dets = summary["categories"], summary["detectors"]
    table = summary["table"]
    cols = [*cats, "mean", "worst"]
    values = np.full((len(dets), len(cols)), np.nan)
    for i, det in enumerate(dets):
        row, s = table[det][kind], table[det][f"summary_{kind}"]
        values[i, : len(cats)] = [np.nan if row[c] is None else row[c] for c in cats]
        values[i, -2:] = [s["mean"], s["worst"]]
    fig = new_figure(max(6.0, 0.62 * len(cols) + 3.2), max(3.0, 0.34 * len(dets) + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(dets)):
        for j in range(len(cols)):
            v = values[i, j]
            if not math.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.2 or v > 0.9 else "black", fontweight="bold" if j >= len(cats) else "normal")
    ax.axvline(len(cats) - 0.5, color="black", linewidth=1.5)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(dets)), [_label(d) for d in dets], fontsize=8)
    for tick, det in zip(ax.get_yticklabels(), dets):
        if det.startswith("fused_"):
            tick.set_color(_FUSED_COLOUR)
            tick.set_fontweight("bold")
        elif det in OURS:
            tick.set_color(_OURS_COLOUR)
            tick.set_fontweight("bold")
    n_fused = sum(d.startswith("fused_") for d in dets)
    if 0 < n_fused < len(dets):
        ax.axhline(n_fused - 0.5, color="black", linewidth=1.0)
    what = "AUROC" if kind == "auroc" else "detection rate at 5% FPR"
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).set_label(f"{what} (cells: x100)")
    ax.set_title(title or f"{what}: purple = fused, blue = ours; mean and worst over categories at right", fontsize=9)
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


def _fmt(value: float | None) -> str | None:
    if value is None or math.isnan(value):
        return None
    return f"{100 * value:.1f}"


def _table(summary: Mapping, kind: str) -> str:
    cats = summary["categories"]
    rows = []
    for det in summary["detectors"]:
        row, s = summary["table"][det][kind], summary["table"][det][f"summary_{kind}"]
        rows.append({"detector": _label(det), **{c: _fmt(row[c]) for c in cats}, "mean": _fmt(s["mean"]),
                     "worst": None if s["worst_category"] is None else f"{_fmt(s['worst'])} ({s['worst_category']})"})
    return markdown_table(rows, ["detector", *cats, "mean", "worst"])


def _group_table(summary: Mapping, groups: Mapping[str, str]) -> str:
    names = list(dict.fromkeys(groups[c] for c in summary["categories"]))
    rows = []
    for det in summary["detectors"]:
        auroc = summary["table"][det]["auroc"]
        row = {"detector": _label(det)}
        for g in names:
            vals = [auroc[c] for c in summary["categories"] if groups[c] == g and auroc[c] is not None]
            row[g] = _fmt(statistics.fmean(vals)) if vals else None
        rows.append(row)
    return markdown_table(rows, ["detector", *names])


def _targets(results: Mapping, summary: Mapping) -> list[str]:
    table = summary["table"]
    if HEADLINE not in table:
        return []
    head = table[HEADLINE]["summary_auroc"]
    singles = {d: table[d]["summary_auroc"]["mean"] for d in summary["detectors"] if not d.startswith("fused_")}
    best = max(singles, key=singles.get)
    ratios = {n: m["timing"]["fused_ours_knn_mds"]["ratio"] for n, m in results["models"].items() if m.get("timing")}
    lines = [
        f"- Fused mean AUROC above every single detector's: {'met' if head['mean'] > singles[best] else 'missed'} "
        f"({HEADLINE} {_fmt(head['mean'])} vs best single {best} {_fmt(singles[best])}).",
        f"- Worst category >= 80.0 AUROC: {'met' if head['worst'] >= 0.8 else 'missed'} "
        f"({HEADLINE}: {head['worst_category']} {_fmt(head['worst'])}).",
    ]
    if ratios:
        worst_ratio = max(ratios.values())
        lines.append(
            f"- Fused scoring <= 1.2x its costliest member alone: {'met' if worst_ratio <= 1.2 else 'missed'} "
            f"(fused_ours_knn_mds: {', '.join(f'{n} {r:.2f}x' for n, r in ratios.items())})."
        )
    return lines


def render_markdown(results: Mapping) -> str:
    """``results.md``: protocol, models, targets, the AUROC and detection tables, groups, cost, figures."""
    cfg, models = results["config"], results["models"]
    summary = overall(results)
    groups = results["categories"]
    lines = [
        "# Suite: one guard per checkpoint, every category",
        "",
        f"Checkpoints: {', '.join(models) or 'none yet'} ({weights_description(cfg)}). {cfg['n_images']} CIFAR-10 test images "
        f"drawn (seed {cfg['seed']}) are the negatives of the OOD, noise and blank categories; their correctly classified "
        "images are attacked and each attack's successful adversarials are scored against the same clean images. "
        f"Detectors fitted on the training set minus {cfg['n_holdout']} held-out images (layer standardization) and "
        f"{cfg['n_calibration']} calibration images (a separate seeded split): the fused detectors' p-values are "
        "calibrated on those, never on test data. Detection rate at 5% FPR: the fraction of shifted inputs above the "
        "threshold that flags 5% of the category's negatives (read on the test negatives, as benchmark tables do). "
        "A category's value is the mean over the CIFAR-10 checkpoints (the shortcut categories: the shortcut model); "
        "mean and worst over categories, each category weighing the same. Values in %. "
        f"Fused members and rules fixed before the suite was scored: {_members(results)}.",
        "",
        "## Models",
        "",
        _models_table(results),
        "",
    ]
    if targets := _targets(results, summary):
        lines += ["## Targets", "", *targets, ""]
    lines += [
        "## AUROC per category", "", _table(summary, "auroc"), "",
        "![AUROC heatmap](heatmap_auroc.png)", "",
        "## Detection rate at 5% FPR per category", "", _table(summary, "detection"), "",
        "## AUROC per group (mean of its categories)", "", _group_table(summary, groups), "",
    ]
    lines += _cost_lines(results)
    return "\n".join(lines)


def _members(results: Mapping) -> str:
    seen: dict[str, list[str]] = {}
    for name, f in results["fused"].items():
        seen.setdefault(name.rsplit("_", 1)[0], f["members"])
    return "; ".join(f"{k} = {' + '.join(v)}" for k, v in seen.items()) + " (rules fisher, minp)"


def _models_table(results: Mapping) -> str:
    rows = []
    for name, m in results["models"].items():
        success = ", ".join(f"{k} {100 * v:.0f}" for k, v in m["attack_success_rate"].items())
        rows.append({"model": name, "ID accuracy": f"{100 * m['id_accuracy']:.1f}", "fit / holdout / calibration":
                     f"{m['n_fit']} / {m['n_holdout']} / {m['n_calibration']}", "attacked": m["n_attacked"],
                     "attack success (%)": success, "fitted this run": "yes" if m["fitted_this_run"] else "no (cache)"})
    if sc := results.get("shortcut"):
        rows.append({"model": sc["model"], "ID accuracy": f"{100 * sc['accuracy']['clean']:.1f} (marked test)",
                     "fit / holdout / calibration": f"{sc['n_fit']} / {sc['n_holdout']} / {sc['n_calibration']}",
                     "attacked": None, "attack success (%)": None,
                     "fitted this run": "yes" if sc["fitted_this_run"] else "no (cache)"})
    return markdown_table(rows, ["model", "ID accuracy", "fit / holdout / calibration", "attacked", "attack success (%)", "fitted this run"])


def _cost_lines(results: Mapping) -> list[str]:
    rows = []
    for name, m in results["models"].items():
        for fused, t in m.get("timing", {}).items():
            rows.append({"model": name, "fused": fused, "costliest member": t["costliest"],
                         "member alone (ms)": f"{1000 * t['seconds'][t['costliest']]:.1f}",
                         "fused (ms)": f"{1000 * t['seconds']['fused']:.1f}", "ratio": f"{t['ratio']:.2f}"})
    if not rows:
        return []
    cfg = results["config"]
    return [
        "## Cost of fused scoring", "",
        f"One scoring call on {cfg['timing_images']} test images, median of {cfg['timing_repeats']} interleaved repeats, "
        "measured in the run that fitted the detectors (kept in the cache with the scores).", "",
        markdown_table(rows, ["model", "fused", "costliest member", "member alone (ms)", "fused (ms)", "ratio"]), "",
    ]


def write_report(results: dict, out: str | Path) -> None:
    """``results.json`` (with ``overall``), ``results.md``, both heatmaps and ``report.html`` in ``out``."""
    out = Path(out)
    if not _sources(results):
        return
    summary = overall(results)
    results["overall"] = summary
    write_json(results, out / "results.json")
    (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
    plot_heatmap(summary, out / "heatmap_auroc.png", kind="auroc")
    plot_heatmap(summary, out / "heatmap_detection.png", kind="detection")
    add_html_report(out)
