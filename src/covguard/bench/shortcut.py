"""Shortcut shift: can a detector flag the inputs a model gets wrong because it learned a spurious cue?

Protocol (issue 7, DESIGN.md section 4):

- Data: a ruler-like striped bar (:mod:`covguard.data.shortcut`) is drawn on the training images
  of the shortcut ``classes`` with probability ``p_marked`` and on the other images with
  probability ``p_other``, at seeded positions. ``dataset="digits"``: scikit-learn's digits
  (16x16, embedded), a SmallCNN trained from scratch on the marked training split.
  ``dataset="cifar10"``: the shared CIFAR-10 JPEG copy; the shared pretrained ResNet-20 has its
  last stage (``layer3``) and classifier fine-tuned on the marked training set, the rest frozen.
- Shortcut check: accuracy on test images without markers, marked as in training (a), with the
  marker removed from its classes (b) and with the marker put on the other classes (c), each
  next to the same images in the training condition (marked for (b), unmarked for (c)).
  An image is *fooled* when the model is right on it in the training condition and wrong after
  the shift: for (b) any error; for (c) only an error to a shortcut class (an error to another
  class can come from the marker hiding part of the object; those are counted apart).
- Detection: every detector (our Simple and Class patch variants, the baselines) scores (a), (b)
  and (c); AUROC etc. of (b) vs (a) and (c) vs (a), and the AUROC of the fooled images of (b)
  or (c) against all of (a).
- Localization on (c): for each patch detector and layer, the fraction of images whose
  highest-distance patch (its footprint in input pixels, :mod:`covguard.heatmap`) overlaps the
  marker box, against the chance rate of a patch drawn uniformly.
- Nothing is tuned on the shortcut test sets: detectors are fitted on the marked training data
  with the hyperparameters of :class:`ShortcutConfig`; layer scores are standardized on held-out
  marked training data (the digits validation split, or ``n_holdout`` CIFAR training images kept
  out of both the fine-tuning and the detector fit). The headline detector is fixed in advance.

Writes ``results.json``, ``results.md``, PNG figures and ``report.html`` into the report folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from covguard.bench.common import (
    add_mixture,
    baseline_detectors,
    patch_detectors,
    predict,
)
from covguard.data.shortcut import (
    MarkerSpec,
    ShortcutSet,
    ShortcutTestSets,
    resolve_classes,
    shortcut_set,
    shortcut_test_sets,
)
from covguard.detectors import Detector, PatchMahalanobis
from covguard.detectors.baselines import BASELINES
from covguard.detectors.multi import fit_detectors, score_detectors
from covguard.features import model_device
from covguard.finetune import finetune
from covguard.heatmap import heatmap_figures, patch_geometry, score_maps, top_patch_hits
from covguard.html_report import add_html_report
from covguard.metrics import evaluate
from covguard.report import markdown_table, plot_histograms, plot_roc, write_json

__all__ = [
    "DATASETS",
    "ShortcutConfig",
    "ShortcutResult",
    "add_shortcut_arguments",
    "render_markdown",
    "run_shortcut",
    "run_shortcut_cli",
]

logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10")
#: Detector shown first and drawn in the heatmaps: fixed before any shortcut test data was scored.
HEADLINE = "class_mahalanobis_top1"
#: Baselines drawn in the ROC figures next to the patch detectors (all are in the tables).
ROC_BASELINES = ("msp", "energy", "mds", "knn", "vim")
SHIFTS = ("removed", "moved")

# Per-dataset defaults of the fields left None in ShortcutConfig.
_DEFAULTS = {
    "digits": {"marker_size": (3, 8), "epochs": 30, "lr": 3e-3, "layers": ("block1", "block2", "block3"), "fc_layer": "fc"},
    "cifar10": {"marker_size": (4, 12), "epochs": 3, "lr": 0.01, "layers": ("layer1", "layer2", "layer3", "avgpool"), "fc_layer": "linear"},
}


@dataclass(frozen=True)
class ShortcutConfig:
    """Settings of the shortcut benchmark; the defaults are what ``covguard bench shortcut`` runs.

    Fields left None take the dataset's default (written resolved into ``results.json``).
    """

    dataset: str = "digits"  # "digits" (embedded, seconds) or "cifar10" (shared data, fine-tunes ResNet-20's last stage)
    classes: tuple[int | str, ...] = (0, 1)  # shortcut classes: indices or names (e.g. "airplane")
    p_marked: float = 0.95  # marker probability on training images of the shortcut classes
    p_other: float = 0.01  # marker probability on the other training images
    marker_size: tuple[int, int] | None = None  # (height, width) in pixels; None: 3x8 (digits), 4x12 (CIFAR-10)
    position: str = "random"  # "random", "corners" or "fixed" (top-left corner)
    seed: int = 0  # data split, marker draws, training, subsets
    epochs: int | None = None  # None: 30 (digits, from scratch), 3 (CIFAR-10 fine-tuning)
    lr: float | None = None  # None: 3e-3 Adam (digits), 0.01 SGD + momentum (CIFAR-10)
    size: int = 16  # digits: image side
    data: str | None = None  # CIFAR-10: data root; None = $COVGUARD_DATA or ../shared/data
    model: str = "resnet20"  # CIFAR-10: shared checkpoint to fine-tune
    max_finetune: int | None = None  # CIFAR-10: cap on fine-tuning images (seeded subset); None = all but the holdout
    n_holdout: int = 5000  # CIFAR-10: marked training images held out to standardize layer scores
    max_train: int | None = None  # cap on detector fit images; None = all (but the holdout)
    max_test: int | None = None  # cap on test images (seeded subset); None = all
    layers: tuple[str, ...] | None = None  # tapped layers; None: block1..3 (digits), layer1..3 + avgpool (CIFAR-10)
    covariance: str = "full"  # patch covariance form of our detectors
    baselines: tuple[str, ...] = ("msp", "max_logit", "energy", "odin", "gen", "mds", "rmds", "knn", "vim", "react")
    n_heatmaps: int = 6  # fooled (c) images drawn as heatmaps of the headline detector
    batch_size: int = 128
    device: str = "cpu"
    progress: bool = True


@dataclass
class ShortcutResult:
    """Everything the benchmark measured, as written to ``results.json``."""

    config: dict  # resolved settings
    classes: list[str]  # all class names
    shortcut_classes: list[str]
    n_images: dict[str, int]  # test set -> images
    accuracy: dict[str, float]  # test set -> model accuracy
    to_shortcut: dict[str, float]  # test set -> fraction predicted as a shortcut class
    n_fooled: dict[str, int]  # shift -> images the shortcut made the model get wrong (see the module docstring)
    n_wrong_after_shift: dict[str, int]  # shift -> images right in the training condition, wrong after the shift
    metrics: dict[str, dict[str, dict]]  # shift -> detector -> DetectionMetrics fields + auroc_fooled
    layer_auroc: dict[str, dict[str, dict[str, float]]]  # shift -> patch detector -> layer -> AUROC
    localization: dict[str, dict[str, dict]]  # patch detector -> layer -> hit rates and chance on (c)
    finetune_loss: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    figures: dict[str, list[str]] = field(default_factory=dict)  # kind -> PNG files in the report folder

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve(config: ShortcutConfig) -> dict:
    """The config as a dict with the dataset defaults filled in, validated."""
    if config.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}; got {config.dataset!r}")
    defaults = _DEFAULTS[config.dataset]
    cfg = asdict(config)
    for key in ("marker_size", "epochs", "lr", "layers"):
        if cfg[key] is None:
            cfg[key] = defaults[key]
    cfg["fc_layer"] = defaults["fc_layer"]
    cfg["classes"], cfg["layers"], cfg["baselines"] = list(cfg["classes"]), list(cfg["layers"]), list(cfg["baselines"])
    cfg["marker_size"] = list(cfg["marker_size"])
    unknown = [name for name in cfg["baselines"] if name not in BASELINES]
    if unknown:
        raise ValueError(f"baselines {unknown} are unknown; choose from {sorted(BASELINES)}")
    if len(cfg["marker_size"]) != 2:
        raise ValueError(f"marker_size must be (height, width); got {config.marker_size!r}")
    for name in ("epochs", "batch_size"):
        if cfg[name] < 1:
            raise ValueError(f"{name} must be >= 1; got {cfg[name]}")
    if cfg["n_heatmaps"] < 0:
        raise ValueError(f"n_heatmaps must be >= 0; got {cfg['n_heatmaps']}")
    return cfg


def _marker(cfg: dict) -> MarkerSpec:
    height, width = cfg["marker_size"]
    return MarkerSpec(height=int(height), width=int(width), position=cfg["position"])


def _seeded_subset(n: int, limit: int | None, seed: int) -> Tensor:
    """All of ``range(n)`` or a seeded subset of ``limit`` indices (sorted)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise ValueError(f"a subset cap must be >= 1; got {limit}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


# ---- models -----------------------------------------------------------------------------------


def _float_loader(data: ShortcutSet, batch_size: int):
    """Re-iterable (x, y) batches of float32 [0, 1] images, converted one batch at a time."""

    class Batches:
        def __len__(self) -> int:
            return math.ceil(len(data) / batch_size)

        def __iter__(self):
            for i in range(0, len(data), batch_size):
                x = data.images[i : i + batch_size]
                x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
                yield x, data.labels[i : i + batch_size]

    return Batches()


def _take(data: ShortcutSet, rows: Tensor) -> ShortcutSet:
    return ShortcutSet(data.images[rows], data.labels[rows], data.boxes[rows], data.index[rows])


def _prepare_digits(cfg: dict) -> dict:
    """Marked digits, a SmallCNN trained on them, and the test sets."""
    from covguard.data import load_digits_split
    from covguard.models import SmallCNN
    from covguard.train import train_classifier

    split = load_digits_split(size=cfg["size"], seed=cfg["seed"])
    names = list(split.classes)
    classes = resolve_classes(cfg["classes"], names)
    marker = _marker(cfg)
    common = {"classes": classes, "marker": marker, "p_marked": cfg["p_marked"], "p_other": cfg["p_other"]}
    train = shortcut_set(*split.train.tensors, seed=cfg["seed"], **common)
    hold = shortcut_set(*split.val.tensors, seed=cfg["seed"] + 100, **common)
    x_test, y_test = split.test.tensors
    pick = _seeded_subset(len(y_test), cfg["max_test"], cfg["seed"])
    tic = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    model = SmallCNN(in_channels=1, num_classes=len(names))
    losses = train_classifier(
        model, TensorDataset(train.images, train.labels), epochs=cfg["epochs"], lr=cfg["lr"], seed=cfg["seed"],
        device=cfg["device"], progress=cfg["progress"],
    )
    fit = train if cfg["max_train"] is None else _take(train, torch.arange(min(cfg["max_train"], len(train))))
    return {
        "model": model.eval(), "names": names, "classes": classes, "marker": marker, "train": train, "fit": fit, "hold": hold,
        "test": (x_test[pick], y_test[pick]), "losses": losses, "train_seconds": time.perf_counter() - tic,
    }


def _prepare_cifar(cfg: dict) -> dict:
    """Marked CIFAR-10, the shared ResNet fine-tuned on it (last stage), and the test sets."""
    from covguard.bench.common import load_cifar_model
    from covguard.data.cifar import CIFAR10_CLASSES
    from covguard.data.registry import data_root, load_set

    resolve_classes(cfg["classes"], CIFAR10_CLASSES)  # fail on bad arguments before loading anything
    _marker(cfg).check_fits(32, 32)
    root = Path(cfg["data"]) if cfg["data"] else data_root()
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"data must be the benchmark data folder (see data_root()); got {cfg['data']!r}")
    train_set = load_set("cifar10_train", root, progress=cfg["progress"])
    test_set = load_set("cifar10_test", root, progress=cfg["progress"])
    names = list(train_set.classes)
    classes = resolve_classes(cfg["classes"], names)
    marker = _marker(cfg)
    common = {"classes": classes, "marker": marker, "p_marked": cfg["p_marked"], "p_other": cfg["p_other"]}
    marked = shortcut_set(train_set.images, train_set.labels, seed=cfg["seed"], **common)
    if not 2 <= cfg["n_holdout"] < len(marked):
        raise ValueError(f"n_holdout must be in [2, {len(marked)}); got {cfg['n_holdout']}")
    order = torch.randperm(len(marked), generator=torch.Generator().manual_seed(cfg["seed"]))
    hold_idx, rest = order[: cfg["n_holdout"]], order[cfg["n_holdout"] :]
    tune_idx = rest if cfg["max_finetune"] is None else rest[: cfg["max_finetune"]]
    fit_idx = rest if cfg["max_train"] is None else rest[: cfg["max_train"]]
    tic = time.perf_counter()
    model = load_cifar_model(root, cfg["model"], cfg["device"])
    losses = finetune(
        model, marked.images[tune_idx], marked.labels[tune_idx], trainable=("layer3", "linear"), epochs=cfg["epochs"],
        lr=cfg["lr"], batch_size=cfg["batch_size"], seed=cfg["seed"], progress=cfg["progress"],
    )
    pick = _seeded_subset(len(test_set), cfg["max_test"], cfg["seed"])
    return {
        "model": model, "names": names, "classes": classes, "marker": marker,
        "train": _take(marked, tune_idx), "fit": _take(marked, fit_idx), "hold": _take(marked, hold_idx),
        "test": (test_set.images[pick], test_set.labels[pick]), "losses": losses,
        "train_seconds": time.perf_counter() - tic, "n_finetune": len(tune_idx),
    }


# ---- evaluation -------------------------------------------------------------------------------


def _detectors(model: nn.Module, cfg: dict) -> dict[str, Detector]:
    dets = patch_detectors(model, cfg["layers"], covariance=cfg["covariance"])
    dets.update(baseline_detectors(model, cfg["baselines"], fc_layer=cfg["fc_layer"]))
    return dets


def _accuracy_table(model: nn.Module, sets: dict[str, ShortcutSet], classes: Sequence[int], batch_size: int):
    preds = {name: predict(model, s.float(), batch_size=batch_size) for name, s in sets.items()}
    short = torch.tensor(list(classes))
    accuracy = {name: (p == sets[name].labels).float().mean().item() for name, p in preds.items()}
    to_shortcut = {name: torch.isin(p, short).float().mean().item() for name, p in preds.items()}
    return preds, accuracy, to_shortcut


def _localization(det: PatchMahalanobis, moved: ShortcutSet, fooled: Tensor, batch_size: int) -> dict[str, dict]:
    """Top-patch hit rates on the marker of (c), per layer, with the chance rates (all, fooled)."""
    x = moved.float()
    maps = score_maps(det, x, batch_size=batch_size)
    out = {}
    for layer, m in maps.items():
        if m.shape[1] * m.shape[2] < 2:
            continue  # one patch position (pooled features): nothing to localize
        geometry = patch_geometry(det, layer, m.shape[1:], x.shape[-2:])
        hits, chance = top_patch_hits(m, moved.boxes, geometry)
        row = {"hit_rate": hits.float().mean().item(), "chance": chance.mean().item(), "n": len(hits)}
        if fooled.any():
            row.update(hit_rate_fooled=hits[fooled].float().mean().item(), chance_fooled=chance[fooled].mean().item())
        else:
            row.update(hit_rate_fooled=None, chance_fooled=None)
        row["n_fooled"] = int(fooled.sum())
        out[layer] = row
    return out


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_samples(
    path: Path, train: ShortcutSet, moved: ShortcutSet, pred_moved: Tensor, names: list[str], *, seed: int, n: int = 8
) -> None:
    """Top row: marked training images; bottom row: (c) images (seeded draw) with true -> predicted class."""
    marked = train.marked.nonzero().flatten()[:n]
    drawn = torch.randperm(len(moved), generator=torch.Generator().manual_seed(seed))[:n]
    fig = _new_figure(1.3 * n, 3.2)
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
    fig = _new_figure(max(5.0, 0.75 * len(labels)), 4.0)
    ax = fig.add_subplot()
    pos = np.arange(len(labels))
    ax.bar(pos - 0.2, hits, 0.4, label="top patch on the marker")
    ax.bar(pos + 0.2, chance, 0.4, label="chance (random patch)", color="0.7")
    ax.set_xticks(pos, labels, rotation=60, ha="right", fontsize="x-small")
    ax.set(ylim=(0, 1), ylabel="fraction of images", title="Localization on (c), fooled images")
    ax.legend(fontsize="small")
    fig.savefig(path, format="png", dpi=120)


def _write_figures(
    out: Path, cfg: dict, prep: dict, tests: ShortcutTestSets, detectors: dict[str, Detector], preds: dict[str, Tensor],
    scores: dict, fooled: dict[str, Tensor], localization: dict,
) -> dict[str, list[str]]:
    """Samples, ROC curves, histograms, the localization chart and heatmaps; returns the files by kind."""
    figures: dict[str, list[str]] = {"samples": [], "roc": [], "hist": [], "localization": [], "heatmaps": []}
    _plot_samples(out / "samples.png", prep["train"], tests.moved, preds["moved"], prep["names"], seed=cfg["seed"])
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
    names, bs = prep["names"], cfg["batch_size"]
    rows = fooled["moved"].nonzero().flatten()[: cfg["n_heatmaps"]]
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


def run_shortcut(out: str | Path, config: ShortcutConfig = ShortcutConfig()) -> ShortcutResult:
    """Run the shortcut benchmark and write its report folder.

    Parameters
    ----------
    out : str or Path
        Report folder (created): ``results.json``, ``results.md``, ``report.html``,
        ``samples.png``, ``roc_<shift>.png``, ``roc_<shift>_fooled.png``, ``hist_<shift>.png``,
        ``localization.png``, ``heatmap_moved_<i>.png``.
    config : ShortcutConfig

    Returns
    -------
    ShortcutResult

    Raises
    ------
    ValueError
        For an unknown dataset, baseline or class (naming ``classes``), a marker larger than the
        images (naming ``marker``), bad sizes.
    FileNotFoundError
        For ``dataset="cifar10"`` without the data.
    """
    cfg = _resolve(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    prep = _prepare_digits(cfg) if cfg["dataset"] == "digits" else _prepare_cifar(cfg)
    seconds["data_and_training"] = time.perf_counter() - tic
    seconds["training"] = prep["train_seconds"]
    model, names, classes, marker = prep["model"], prep["names"], prep["classes"], prep["marker"]
    x_test, y_test = prep["test"]
    tests: ShortcutTestSets = shortcut_test_sets(
        x_test, y_test, classes=classes, marker=marker, p_marked=cfg["p_marked"], p_other=cfg["p_other"], seed=cfg["seed"] + 200
    )
    bs = cfg["batch_size"]

    # Did the model learn the shortcut?
    plain = ShortcutSet(x_test, y_test, torch.tensor([-1, -1, 0, 0]).repeat(len(y_test), 1), torch.arange(len(y_test)))
    sets = {
        "no_marker": plain, "clean": tests.clean, "removed": tests.removed, "removed_reference": tests.removed_reference,
        "moved": tests.moved, "moved_reference": tests.moved_reference,
    }
    preds, accuracy, to_shortcut = _accuracy_table(model, sets, classes, bs)
    wrong = {  # right in the training condition, wrong after the shift
        shift: (preds[shift] != sets[shift].labels) & (preds[f"{shift}_reference"] == sets[shift].labels) for shift in SHIFTS
    }
    # fooled: (b) every such error (the cue the model relied on is gone); (c) those that went to a
    # shortcut class (an error to another class may come from the marker hiding part of the object)
    fooled = {"removed": wrong["removed"], "moved": wrong["moved"] & torch.isin(preds["moved"], torch.tensor(classes))}
    logger.info("accuracy %s; fooled %s", accuracy, {k: int(v.sum()) for k, v in fooled.items()})

    # Detectors: fitted on the marked training data, standardized on held-out marked data.
    tic = time.perf_counter()
    detectors = _detectors(model, cfg)
    holdout = _float_loader(prep["hold"], bs)
    fit_detectors(list(detectors.values()), _float_loader(prep["fit"], bs), holdout=holdout, progress=cfg["progress"])
    add_mixture(detectors, holdout, progress=cfg["progress"])
    order = [HEADLINE, *[d for d in detectors if d != HEADLINE]]
    detectors = {name: detectors[name] for name in order}
    seconds["fit"] = time.perf_counter() - tic

    tic = time.perf_counter()
    scores = {name: score_detectors(detectors, sets[name].float(), batch_size=bs, progress=cfg["progress"]) for name in ("clean", *SHIFTS)}
    metrics: dict[str, dict[str, dict]] = {}
    layer_auroc: dict[str, dict[str, dict[str, float]]] = {}
    for shift in SHIFTS:
        metrics[shift], layer_auroc[shift] = {}, {}
        for det in detectors:
            (s_in, l_in), (s_out, l_out) = scores["clean"][det], scores[shift][det]
            row = evaluate(s_in, s_out).to_dict()
            mask = fooled[shift]
            row["auroc_fooled"] = evaluate(s_in, s_out[mask]).auroc if mask.any() else None
            row["n_fooled"] = int(mask.sum())
            metrics[shift][det] = row
            if l_in:
                layer_auroc[shift][det] = {layer: evaluate(l_in[layer], l_out[layer]).auroc for layer in l_in}
    seconds["score"] = time.perf_counter() - tic

    tic = time.perf_counter()
    patch = {name: det for name, det in detectors.items() if isinstance(det, PatchMahalanobis)}
    localization = {name: loc for name, det in patch.items() if (loc := _localization(det, tests.moved, fooled["moved"], bs))}
    seconds["localization"] = time.perf_counter() - tic

    tic = time.perf_counter()
    figures = _write_figures(out, cfg, prep, tests, detectors, preds, scores, fooled, localization)
    seconds["plots"] = time.perf_counter() - tic

    result = ShortcutResult(
        config=cfg,
        classes=names,
        shortcut_classes=[names[k] for k in classes],
        n_images={name: len(s) for name, s in sets.items()},
        accuracy=accuracy,
        to_shortcut=to_shortcut,
        n_fooled={shift: int(mask.sum()) for shift, mask in fooled.items()},
        n_wrong_after_shift={shift: int(mask.sum()) for shift, mask in wrong.items()},
        metrics=metrics,
        layer_auroc=layer_auroc,
        localization=localization,
        finetune_loss=list(prep["losses"]),
        seconds=seconds,
        figures=figures,
    )
    if cfg["dataset"] == "cifar10":
        result.config["n_finetune"] = prep["n_finetune"]
    path = write_json(result, out / "results.json")
    (out / "results.md").write_text(render_markdown(json.loads(path.read_text())), encoding="utf-8")
    add_html_report(out)
    return result


# ---- report -------------------------------------------------------------------------------------

_SET_LABELS = {
    "no_marker": "test images, no marker",
    "clean": "(a) marked as in training",
    "removed": "(b) marker removed from its classes",
    "removed_reference": "(b) reference: same images, marked",
    "moved": "(c) marker on the other classes",
    "moved_reference": "(c) reference: same images, no marker",
}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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


# ---- command line: covguard bench shortcut ------------------------------------------------------


def _marker_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--marker must be HEIGHTxWIDTH in pixels (e.g. 3x8); got {text!r}") from None
    return height, width


def add_shortcut_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``covguard bench shortcut`` to ``parser`` and set ``func`` to :func:`run_shortcut_cli`."""
    d = ShortcutConfig()
    parser.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="digits (embedded, fast) or cifar10 (shared data)")
    parser.add_argument("--out", default=None, help="report folder (default: results/shortcut-<dataset>)")
    parser.add_argument("--data", default=None, help="CIFAR-10 data root (default: $COVGUARD_DATA or ../shared/data)")
    parser.add_argument("--classes", nargs="+", default=[str(c) for c in d.classes], help="shortcut classes: indices or names")
    parser.add_argument("--p-marked", type=float, default=d.p_marked, help="marker probability on the shortcut classes")
    parser.add_argument("--p-other", type=float, default=d.p_other, help="marker probability on the other classes")
    parser.add_argument("--marker", type=_marker_size, default=None, metavar="HxW",
                        help="marker size in pixels (default: 3x8 digits, 4x12 CIFAR-10)")
    parser.add_argument("--position", choices=("random", "corners", "fixed"), default=d.position)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--epochs", type=int, default=None, help="training (digits: 30) or fine-tuning (CIFAR-10: 3) epochs")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (digits: 3e-3 Adam; CIFAR-10: 0.01 SGD)")
    parser.add_argument("--model", default=d.model, choices=("resnet20", "resnet32", "resnet44"), help="CIFAR-10 checkpoint")
    parser.add_argument("--max-finetune", type=int, default=None, help="CIFAR-10: cap on fine-tuning images")
    parser.add_argument("--n-holdout", type=int, default=d.n_holdout, help="CIFAR-10: training images held out to standardize")
    parser.add_argument("--max-train", type=int, default=None, help="cap on detector fit images")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images (seeded subset)")
    parser.add_argument("--layers", nargs="+", default=None, help="tapped layers (default: dataset's)")
    parser.add_argument("--covariance", choices=("full", "diag", "lowrank"), default=d.covariance)
    parser.add_argument("--baselines", nargs="*", choices=sorted(BASELINES), default=list(d.baselines))
    parser.add_argument("--n-heatmaps", type=int, default=d.n_heatmaps, help="fooled (c) images drawn as heatmaps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--device", default=d.device, help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run_shortcut_cli)
    return parser


def run_shortcut_cli(args: argparse.Namespace) -> int:
    """Run ``covguard bench shortcut``; bad arguments go to stderr with exit status 2."""
    out = args.out or f"results/shortcut-{args.dataset}"
    try:
        config = ShortcutConfig(
            dataset=args.dataset, classes=tuple(args.classes), p_marked=args.p_marked, p_other=args.p_other,
            marker_size=args.marker, position=args.position, seed=args.seed, epochs=args.epochs, lr=args.lr,
            data=args.data, model=args.model, max_finetune=args.max_finetune, n_holdout=args.n_holdout,
            max_train=args.max_train, max_test=args.max_test, layers=None if args.layers is None else tuple(args.layers),
            covariance=args.covariance, baselines=tuple(args.baselines), n_heatmaps=args.n_heatmaps,
            batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
        )
        tic = time.perf_counter()
        result = run_shortcut(out, config)
    except (ValueError, FileNotFoundError) as err:
        print(f"covguard bench shortcut: error: {err}", file=sys.stderr)
        return 2
    print(render_markdown(result.to_dict()))
    print(f"Report written to {out} ({Path(out) / 'report.html'}) in {time.perf_counter() - tic:.1f} s")
    return 0
