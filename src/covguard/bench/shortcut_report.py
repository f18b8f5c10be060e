"""The shortcut benchmark's report: its figures and its markdown (:mod:`covguard.bench.shortcut`).

:func:`write_figures` draws samples, ROC curves, histograms, the localization chart and heatmaps
into the report folder; :func:`render_markdown` turns the ``results.json`` dict into
``results.md`` (a function of the JSON alone, so a report can be re-rendered offline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from covguard.bench.shortcut_config import HEADLINE, ROC_BASELINES, SHIFTS, ShortcutConfig
from covguard.bench.shortcut_setup import ShortcutSetup
from covguard.data.shortcut import ShortcutSet, ShortcutTestSets
from covguard.detectors import Detector, PatchMahalanobis
from covguard.heatmap import heatmap_figures
from covguard.report import markdown_table, new_figure, plot_histograms, plot_roc

__all__ = ["render_markdown", "write_figures"]


def _plot_samples(
    path: Path, train: ShortcutSet, moved: ShortcutSet, pred_moved: Tensor, names: list[str], *, seed: int, n: int = 8
) -> None:
    """Top row: marked training images; bottom row: (c) images (seeded draw) with true -> predicted class."""
    marked = train.marked.nonzero().flatten()[:n]
    drawn = torch.randperm(len(moved), generator=torch.Generator().manual_seed(seed))[:n]
    fig = new_figure(1.3 * n, 3.2)
    axes = fig.subplots(2, n, squeeze=False)
    for row, (data, rows) in enumerate(((train, marked), (moved, drawn))):
        x = data.float()
        for col in range(n):
            ax = axes[row, col]
            ax.set_axis_off()
            if col >= len(rows):
                continue
            i = int(rows[col])
            img = x[i].permute(1, 2, 0).numpy() if x.shape[1] == 3 else x[i].mean(0).numpy()
            ax.imshow(img, cmap=None if x.shape[1] == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
            label = names[int(data.labels[i])]
            title = f"train: {label}" if row == 0 else f"{label} -> {names[int(pred_moved[i])]}"
            ax.set_title(title, fontsize="x-small")
    fig.savefig(path, format="png", dpi=110)


def _plot_localization(path: Path, localization: dict[str, dict[str, dict]]) -> None:
    """Bars: top-patch hit rate on the fooled (c) images (all when none) and chance, per detector and layer."""
    labels, hits, chance = [], [], []
    for det, per_layer in localization.items():
        for layer, row in per_layer.items():
            fooled = row["hit_rate_fooled"] is not None
            labels.append(f"{det}\n{layer}")
            hits.append(row["hit_rate_fooled"] if fooled else row["hit_rate"])
            chance.append(row["chance_fooled"] if fooled else row["chance"])
    fig = new_figure(max(5.0, 0.75 * len(labels)), 4.0)
    ax = fig.add_subplot()
    pos = np.arange(len(labels))
    ax.bar(pos - 0.2, hits, 0.4, label="top patch on the marker")
    ax.bar(pos + 0.2, chance, 0.4, label="chance (random patch)", color="0.7")
    ax.set_xticks(pos, labels, rotation=60, ha="right", fontsize="x-small")
    ax.set(ylim=(0, 1), ylabel="fraction of images", title="Localization on (c), fooled images")
    ax.legend(fontsize="small")
    fig.savefig(path, format="png", dpi=120)


def write_figures(
    out: Path, cfg: ShortcutConfig, setup: ShortcutSetup, tests: ShortcutTestSets, detectors: dict[str, Detector],
    preds: dict[str, Tensor], scores: dict, fooled: dict[str, Tensor], localization: dict,
) -> dict[str, list[str]]:
    """Samples, ROC curves, histograms, the localization chart and heatmaps; returns the files by kind.

    ``preds``: predicted classes per test set; ``scores``: :func:`score_detectors` output per
    test set (``clean`` and the shifts); ``fooled``: boolean mask per shift.
    """
    figures: dict[str, list[str]] = {"samples": [], "roc": [], "hist": [], "localization": [], "heatmaps": []}
    _plot_samples(out / "samples.png", setup.train, tests.moved, preds["moved"], setup.names, seed=cfg.seed)
    figures["samples"].append("samples.png")
    patch = [name for name, det in detectors.items() if isinstance(det, PatchMahalanobis)]
    shown = [*patch, *[b for b in ROC_BASELINES if b in detectors]]
    titles = {"removed": "(b) marker removed", "moved": "(c) marker moved"}
    for shift in SHIFTS:
        curves = {d: (scores["clean"][d][0], scores[shift][d][0]) for d in shown}
        plot_roc(curves, out / f"roc_{shift}.png", title=f"{titles[shift]} vs (a)")
        figures["roc"].append(f"roc_{shift}.png")
        if fooled[shift].any():
            curves = {d: (s_in, s_out[fooled[shift]]) for d, (s_in, s_out) in curves.items()}
            plot_roc(curves, out / f"roc_{shift}_fooled.png", title=f"{titles[shift]}, fooled images only, vs (a)")
            figures["roc"].append(f"roc_{shift}_fooled.png")
        plot_histograms(
            scores["clean"][HEADLINE][0], scores[shift][HEADLINE][0], out / f"hist_{shift}.png",
            label_in="(a) as in training", label_out=titles[shift], title=f"{HEADLINE} scores",
        )
        figures["hist"].append(f"hist_{shift}.png")
    if localization:
        _plot_localization(out / "localization.png", localization)
        figures["localization"].append("localization.png")
    names, bs = setup.names, cfg.batch_size
    rows = fooled["moved"].nonzero().flatten()[: cfg.n_heatmaps]
    if len(rows):
        det = detectors[HEADLINE]
        x = tests.moved.float()[rows]  # (n, C, H, W)
        captions = [
            f"(c) {names[int(tests.moved.labels[i])]} predicted {names[int(preds['moved'][i])]}, score {float(v):.3g}"
            for i, v in zip(rows, scores["moved"][HEADLINE][0][rows])
        ]
        for i, fig in enumerate(heatmap_figures(det, x, boxes=tests.moved.boxes[rows], titles=captions, batch_size=bs)):
            name = f"heatmap_moved_{i:02d}.png"
            fig.savefig(out / name, format="png", dpi=110)
            figures["heatmaps"].append(name)
    return figures


# ---- markdown -----------------------------------------------------------------------------------

_SET_LABELS = {
    "no_marker": "test images, no marker",
    "clean": "(a) marked as in training",
    "removed": "(b) marker removed from its classes",
    "removed_reference": "(b) reference: same images, marked",
    "moved": "(c) marker on the other classes",
    "moved_reference": "(c) reference: same images, no marker",
}


def render_markdown(result: dict) -> str:
    """The benchmark's tables and figures (markdown), from the ``results.json`` dict."""
    cfg = result["config"]
    dataset = {"digits": "digits (SmallCNN trained from scratch)", "cifar10": f"CIFAR-10 ({cfg['model']}, last stage fine-tuned)"}[cfg["dataset"]]
    figures = result.get("figures", {})
    metrics = result["metrics"]
    # results.json sorts keys: put the detectors back in a fixed order, headline first
    first = [HEADLINE, "class_mahalanobis_mixture", "simple_mahalanobis", "class_penultimate_original"]
    order = {name: i for i, name in enumerate([*first, *cfg["baselines"]])}
    detectors = sorted(metrics["moved"], key=lambda d: (order.get(d, len(order)), d))
    layered = [d for d in detectors if d in result["layer_auroc"]["moved"]]  # ours, with per-layer scores
    patch = [d for d in layered if d != "class_penultimate_original"]  # (pooled features: not a patch detector)
    baselines = [d for d in detectors if d not in layered]
    h, w = cfg["marker_size"]
    lines = [
        f"# Shortcut shift: {dataset}",
        "",
        (
            f"A {h}x{w}-pixel striped bar (position: {cfg['position']}) is drawn on the training images of the shortcut "
            f"classes {', '.join(result['shortcut_classes'])} with probability {cfg['p_marked']} and on the other classes' "
            f"images with probability {cfg['p_other']}. Test sets: (a) marked as in training, (b) the shortcut classes without "
            "the marker, (c) the other classes with the marker. An image is *fooled* when the model is right on it in the "
            "training condition and wrong after the shift, for (c) wrong with a shortcut class. Detectors are fitted on the "
            "marked training data only; "
            f"headline detector fixed in advance: {HEADLINE}. Seed {cfg['seed']}."
        ),
        "",
    ]
    if figures.get("samples"):
        lines += ["![samples](samples.png)", ""]
    rows = [
        {"test set": _SET_LABELS[k], "images": result["n_images"][k], "accuracy": result["accuracy"][k],
         "predicted as a shortcut class": result["to_shortcut"][k]}
        for k in _SET_LABELS
    ]
    lines += [
        "## Did the model learn the shortcut?",
        "",
        markdown_table(rows, ["test set", "images", "accuracy", "predicted as a shortcut class"]),
        "",
        (
            f"Fooled by the shortcut: {result['n_fooled']['removed']} of {result['n_images']['removed']} images of (b), "
            f"{result['n_fooled']['moved']} of {result['n_images']['moved']} of (c) "
            f"({result['n_wrong_after_shift']['moved']} of (c) right without the marker and wrong with it, any class)."
        ),
        "",
    ]
    for title, key in (
        ("AUROC against (a) (higher is better)", "auroc"),
        ("FPR at 95% TPR against (a), in-distribution positive (lower is better)", "fpr_at_95tpr"),
    ):
        rows = []
        for det in detectors:
            row = {"detector": det}
            for shift in SHIFTS:
                row[f"({'b' if shift == 'removed' else 'c'}) {shift}"] = metrics[shift][det][key]
                if key == "auroc":
                    row[f"({'b' if shift == 'removed' else 'c'}) fooled only"] = metrics[shift][det]["auroc_fooled"]
            rows.append(row)
        columns = ["detector", *[c for c in rows[0] if c != "detector"]]
        lines += [f"## {title}", "", markdown_table(rows, columns), ""]
    best_patch = max(patch, key=lambda d: metrics["moved"][d]["auroc"])
    best_base = max(baselines, key=lambda d: metrics["moved"][d]["auroc"]) if baselines else None
    summary = f"On (c), the best patch detector is {best_patch} (AUROC {metrics['moved'][best_patch]['auroc']:.3f}"
    if metrics["moved"][best_patch]["auroc_fooled"] is not None:
        summary += f", {metrics['moved'][best_patch]['auroc_fooled']:.3f} on fooled images"
    summary += ")"
    if best_base:
        summary += f"; the best baseline is {best_base} (AUROC {metrics['moved'][best_base]['auroc']:.3f}"
        if metrics["moved"][best_base]["auroc_fooled"] is not None:
            summary += f", {metrics['moved'][best_base]['auroc_fooled']:.3f} on fooled images"
        summary += ")"
    lines += [summary + ". (Best picked after the fact, for the summary only.)", ""]
    lines += [f"![ROC]({name})" for name in figures.get("roc", [])] + [""]
    rows = [
        {"shift": shift, "detector": det, **dict.fromkeys(cfg["layers"]), **result["layer_auroc"][shift][det]}
        for shift in SHIFTS for det in layered
    ]
    lines += ["## Per-layer AUROC of the patch detectors", "", markdown_table(rows, ["shift", "detector", *cfg["layers"]]), ""]
    lines += [f"![histogram]({name})" for name in figures.get("hist", [])] + [""]
    rows = [
        {"detector": det, "layer": layer, "top patch on marker (all)": row["hit_rate"], "chance (all)": row["chance"],
         "top patch on marker (fooled)": row["hit_rate_fooled"], "chance (fooled)": row["chance_fooled"],
         "fooled images": row["n_fooled"]}
        for det in detectors if det in result["localization"]
        for layer, row in sorted(result["localization"][det].items(), key=lambda item: cfg["layers"].index(item[0]))
    ]
    lines += [
        "## Localization on (c): does the highest-distance patch land on the marker?",
        "",
        (
            "Hit: the footprint in input pixels of the patch with the largest distance overlaps the marker box. Chance: "
            "the fraction of patches whose footprint overlaps it (a patch drawn at random). Layers with a single "
            "position are left out."
        ),
        "",
        markdown_table(rows, ["detector", "layer", "top patch on marker (all)", "chance (all)",
                              "top patch on marker (fooled)", "chance (fooled)", "fooled images"]) if rows else "(no patch layer)",
        "",
    ]
    lines += [f"![localization]({name})" for name in figures.get("localization", [])] + [""]
    if figures.get("heatmaps"):
        lines += [
            "## Heatmaps of fooled (c) images",
            "",
            (
                f"{HEADLINE}: squared patch distances per layer over the image; the marker is outlined in cyan; colour "
                "scales shared per layer across these images."
            ),
            "",
            *[f"![heatmap]({name})" for name in figures["heatmaps"]],
            "",
        ]
    secs = result.get("seconds", {})
    if secs:
        lines += ["Seconds: " + ", ".join(f"{k} {secs[k]:.1f}" for k in sorted(secs)) + ".", ""]
    return "\n".join(lines)
