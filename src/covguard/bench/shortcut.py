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
Settings: :mod:`~covguard.bench.shortcut_config`; marked data and model:
:mod:`~covguard.bench.shortcut_setup`; figures and markdown: :mod:`~covguard.bench.shortcut_report`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from covguard.bench.common import add_mixture, baseline_detectors, patch_detectors, predict
from covguard.bench.shortcut_config import DATASETS, HEADLINE, SHIFTS, ShortcutConfig
from covguard.bench.shortcut_report import render_markdown, write_figures
from covguard.bench.shortcut_setup import float_batches, prepare
from covguard.data.shortcut import ShortcutSet, ShortcutTestSets, shortcut_test_sets
from covguard.detectors import Detector, PatchMahalanobis
from covguard.detectors.multi import fit_detectors, score_detectors
from covguard.heatmap import patch_geometry, score_maps, top_patch_hits
from covguard.html_report import add_html_report
from covguard.metrics import evaluate
from covguard.report import write_json

__all__ = ["DATASETS", "ShortcutConfig", "ShortcutResult", "run_shortcut"]

logger = logging.getLogger(__name__)


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


def _detectors(model: nn.Module, cfg: ShortcutConfig) -> dict[str, Detector]:
    dets = patch_detectors(model, cfg.layers, covariance=cfg.covariance)
    dets.update(baseline_detectors(model, cfg.baselines, fc_layer=cfg.fc_layer))
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
    cfg = config.resolved()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    setup = prepare(cfg)
    seconds["data_and_training"] = time.perf_counter() - tic
    seconds["training"] = setup.train_seconds
    model, names, classes, marker = setup.model, setup.names, setup.classes, setup.marker
    x_test, y_test = setup.test
    tests: ShortcutTestSets = shortcut_test_sets(
        x_test, y_test, classes=classes, marker=marker, p_marked=cfg.p_marked, p_other=cfg.p_other, seed=cfg.seed + 200
    )
    bs = cfg.batch_size

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
    holdout = float_batches(setup.hold, bs)
    fit_detectors(list(detectors.values()), float_batches(setup.fit, bs), holdout=holdout, progress=cfg.progress)
    add_mixture(detectors, holdout, progress=cfg.progress)
    order = [HEADLINE, *[d for d in detectors if d != HEADLINE]]
    detectors = {name: detectors[name] for name in order}
    seconds["fit"] = time.perf_counter() - tic

    tic = time.perf_counter()
    scores = {name: score_detectors(detectors, sets[name].float(), batch_size=bs, progress=cfg.progress) for name in ("clean", *SHIFTS)}
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
    figures = write_figures(out, cfg, setup, tests, detectors, preds, scores, fooled, localization)
    seconds["plots"] = time.perf_counter() - tic

    result = ShortcutResult(
        config=asdict(cfg),
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
        finetune_loss=list(setup.losses),
        seconds=seconds,
        figures=figures,
    )
    if setup.n_finetune is not None:
        result.config["n_finetune"] = setup.n_finetune
    path = write_json(result, out / "results.json")
    (out / "results.md").write_text(render_markdown(json.loads(path.read_text())), encoding="utf-8")
    add_html_report(out)
    return result
