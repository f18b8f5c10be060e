"""Report of ``covguard bench frontier``: the quality/cost table, the scatter plot, the default.

Writes ``results.json`` (everything measured), ``results.md`` (the tables), ``frontier.png``
(overhead at batch 256 against AUROC, one panel per category) and ``report.html``. Written after
every stage of a run: sections whose measurements are not there yet are left out.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path

from covguard.bench.common import weights_description
from covguard.html_report import add_html_report
from covguard.report import markdown_table, new_figure, write_json

__all__ = ["read_report", "render_markdown", "write_report"]

CATEGORY_TITLES = {"val": "validation (ID-val vs OOD-val)", "near": "near OOD", "far": "far OOD", "adversarial": "attacks (mean)"}


def _mean_category(results: Mapping, variant: str, cat: str) -> float:
    return statistics.fmean({**m["quality"]["categories"], **m.get("sweep", {}).get("categories", {})}[variant][cat]
                            for m in results["models"].values())


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _overhead(results: Mapping, variant: str, model: str, batch: int) -> float | None:
    return results["timing"].get(model, {}).get(variant.split("@")[0], {}).get(str(batch))


def _quality_rows(results: Mapping) -> list[dict]:
    rows = []
    for variant in results["variants"]:
        if "@" in variant:
            continue
        row = {"detector/form": variant, **{cat: _pct(_mean_category(results, variant, cat)) for cat in CATEGORY_TITLES}}
        for model in results["config"]["timing_models"]:
            for batch in results["config"]["batch_sizes"]:
                row[f"{model} b{batch}"] = _pct(_overhead(results, variant, model, batch))
        rows.append(row)
    return rows


def _positions_rows(results: Mapping) -> list[dict]:
    rows = []
    for variant in results["variants"]:
        if "@" not in variant:
            continue
        exact = variant.split("@")[0]
        rows.append({"detector/form": exact, **{
            cat: f"{100 * _mean_category(results, exact, cat):.1f} -> {100 * _mean_category(results, variant, cat):.1f}"
            for cat in CATEGORY_TITLES}})
    return rows


def _budget_models(cfg: Mapping) -> list[str]:
    return list(cfg.get("budget_models", cfg["timing_models"]))


def _sweep_rows(results: Mapping) -> list[dict]:
    """Every measured share of positions of the default forms (exact, fit_positions, the sweep)."""
    cfg, rows = results["config"], []
    for kind, d in results["default"].items():
        exact = f"{kind}/{d['form']}"
        shares = {1.0: exact, cfg["fit_positions"]: f"{exact}@positions",
                  **{p: f"{exact}@{p:g}" for p in cfg.get("sweep_positions", ())}}
        for p, variant in sorted(shares.items(), reverse=True):
            if all(variant in {**m["quality"]["categories"], **m.get("sweep", {}).get("categories", {})} for m in results["models"].values()):
                rows.append({"detector/form": exact, "fit_positions": f"{p:g}",
                             **{cat: _pct(_mean_category(results, variant, cat)) for cat in CATEGORY_TITLES}})
    return rows


def _default_lines(results: Mapping) -> list[str]:
    cfg = results["config"]
    rows = [{
        "detector": kind, "form": d["form"], "fit_positions": f"{d['fit_positions']:g}", "val AUROC": _pct(d["val_auroc"]),
        "overhead b256 (budget models)": _pct(d["overhead_256"]), "within budget": "yes" if d["within_budget"] else "no",
        **{f"delta {cat}": f"{100 * v:+.1f}" for cat, v in d["delta_vs_full"].items()},
    } for kind, d in results["default"].items()]
    return [
        "## The default, chosen on validation data and measured cost", "",
        f"Rule: among the forms whose overhead at batch 256 is at most "
        f"{100 * cfg['overhead_budget']:.0f} % on {', '.join(_budget_models(cfg))}, the highest validation AUROC "
        "(none within: the highest overall, flagged); then the smallest "
        f"share of patch positions per fit image whose validation AUROC is within {100 * cfg['positions_tolerance']:.1f} "
        "points of exact statistics. The deltas against full covariance on the test categories (AUROC points) are read "
        "after the choice; they chose nothing.", "",
        markdown_table(rows, list(rows[0])), "",
        "Shares of positions of the default forms (AUROC %):", "",
        markdown_table(_sweep_rows(results), ["detector/form", "fit_positions", *CATEGORY_TITLES]), "",
    ]


def _fit_lines(results: Mapping) -> list[str]:
    rows = [{"model": model, "configuration": r["detector"], "forward ms/image": f"{r['forward_ms_per_image']:.3f}",
             "fit ms/image": f"{r['fit_ms_per_image']:.3f}", "fit / forward throughput": f"{r['throughput_ratio']:.2f}x"}
            for model, rs in results["fit"].items() for r in rs]
    cfg = results["config"]
    return [
        "## Fit throughput", "",
        f"Streaming fit time per image (forward with the taps and `partial_fit`, batches {cfg['fit_batches'][0] + 1} to "
        f"{cfg['fit_batches'][1]} of {cfg['batch_size']} images, medians of {cfg['repeats']} repeats) against one bare forward "
        "per image of the same batches. The covariance estimation at the end of a fit (eigendecompositions) is a cost per fit, "
        "not per image, and is not in these numbers.", "",
        markdown_table(rows, list(rows[0])), "",
    ]


def render_markdown(results: Mapping) -> str:
    """``results.md`` of a (possibly partial) run."""
    cfg = results["config"]
    lines = [
        "# Quality/cost frontier of the covariance forms", "",
        f"Quality on {', '.join(results['models'])} ({weights_description(cfg)}), {cfg['n_images']} seeded images per test set; "
        f"validation protocol of OpenOOD v1.5: {cfg['n_id_val']} ID-val images and {cfg['n_ood_val_classes']} Tiny ImageNet classes "
        "held out of every test set. near = mean of CIFAR-100 and Tiny ImageNet, far = mean of MNIST and MNIST-JPEG, attacks = mean "
        f"of {', '.join(cfg['attacks'])} at {cfg['eps'] * 255:g}/255 on the correctly classified test images. "
        "Every form of a detector is derived from one fit (kept moments). Overhead = t(forward + detector) / t(forward) - 1 "
        f"in %, medians of {cfg['repeats']} interleaved repeats, every form fitted on the timed images; resnet20: the "
        "checkpoint, four taps (layer1-3 3x3, avgpool 1x1); resnet18_32x32: random init, layer1-4.", "",
    ]
    if results["models"]:
        lines += ["## AUROC (%) and scoring overhead (%)", "", markdown_table(_quality_rows(results), list(_quality_rows(results)[0])), "",
                  *(["![frontier](frontier.png)", ""] if results["timing"] else []),
                  f"## Exact statistics -> fit_positions={cfg['fit_positions']:g} (AUROC %)", "",
                  markdown_table(_positions_rows(results), list(_positions_rows(results)[0])), ""]
    if results.get("default"):
        lines += _default_lines(results)
    if results.get("fit"):
        lines += _fit_lines(results)
    return "\n".join(lines)


def plot_frontier(results: Mapping, path: Path) -> None:
    """Overhead at batch 256 (worst budget model, log scale) against mean AUROC, one panel per category."""
    fig = new_figure(12, 3.4)
    axes = fig.subplots(1, len(CATEGORY_TITLES))
    markers = {"simple": "o", "class-top1": "s"}
    for ax, (cat, title) in zip(axes, CATEGORY_TITLES.items()):
        for variant in results["variants"]:
            costs = [_overhead(results, variant, m, 256) for m in _budget_models(results["config"]) if m in results["timing"]]
            if "@" in variant or not costs or None in costs:
                continue
            kind, form = variant.split("/", 1)
            x, y = max(max(costs), 1e-3) * 100, 100 * _mean_category(results, variant, cat)
            ax.scatter([x], [y], marker=markers[kind], color="#1f77b4" if kind == "simple" else "#d62728", s=24)
            ax.annotate(form, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axvline(100 * results["config"]["overhead_budget"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"overhead at batch 256, {', '.join(_budget_models(results['config']))} (%)", fontsize=8)
    axes[0].set_ylabel("AUROC (%)  o simple, [] class top-1", fontsize=8)
    fig.savefig(path, format="png", dpi=120)


def read_report(out: Path) -> dict | None:
    """The ``results.json`` of a report folder, or None when there is none."""
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(results: Mapping, out: Path) -> None:
    """Write ``results.json``, ``results.md``, ``frontier.png`` (once quality and timing exist) and ``report.html``."""
    write_json(results, out / "results.json")
    (out / "results.md").write_text(render_markdown(results) + "\n")
    if results["models"] and results["timing"]:
        plot_frontier(results, out / "frontier.png")
    add_html_report(out)
