"""The suite's shortcut categories: ``bench shortcut``'s CIFAR-10 recipe, guarded the suite's way.

The model is the recipe's (:func:`covguard.bench.shortcut_setup.prepare`: a striped marker on
95 % of the airplane and automobile training images and 1 % of the others, the shared ResNet's
last stage fine-tuned on them). The detectors are the suite's line-up with the same settings,
fitted on the marked training images; the recipe's ``n_holdout`` marked images standardize
layer scores and the last ``n_calibration`` images of the fit split (a seeded permutation) are
kept out of the fit as the fused detectors' calibration. Categories: ``shortcut_moved`` (the
marker on test images of the other classes) and ``shortcut_removed`` (test images of the
shortcut classes without it), each against the test images marked as in training.

Everything the run produces (every set's scores, the accuracies, the split sizes) is one cache
entry, keyed by the recipe, the base checkpoint's weights and the training and test images: a
cached run neither fine-tunes nor fits.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from covguard.bench.cache import TensorCache, tensor_sha256
from covguard.bench.common import accuracy, add_mixture, baseline_detectors, load_cifar_model, patch_detectors
from covguard.bench.shortcut_config import ShortcutConfig
from covguard.bench.shortcut_setup import float_batches, prepare
from covguard.bench.suite_config import SuiteConfig
from covguard.bench.suite_metrics import category_metrics, with_fused
from covguard.data.registry import load_set
from covguard.data.shortcut import ShortcutSet, shortcut_test_sets
from covguard.detectors.multi import fit_detectors, score_detectors
from covguard.features import parameter_sha256

__all__ = ["run_shortcut_model", "shortcut_config"]

_SETS = ("calibration", "clean", "moved", "removed")
_NOT_IN_KEY = ("data", "device", "progress", "n_heatmaps")  # do not change the scores


def shortcut_config(cfg: SuiteConfig, root: Path) -> ShortcutConfig:
    """``bench shortcut``'s CIFAR-10 recipe with the suite's seed, holdout, line-up and caps (resolved).

    ``max_train`` stays None here: the suite caps the fit split itself, after taking the calibration.
    """
    return ShortcutConfig(
        dataset="cifar10", model=cfg.shortcut_model, data=str(root), seed=cfg.seed, n_holdout=cfg.n_holdout,
        max_finetune=cfg.shortcut_max_finetune, max_test=cfg.shortcut_max_test, covariance=cfg.covariance,
        baselines=cfg.baselines, device=cfg.device, progress=cfg.progress,
    ).resolved()


def _rows(data: ShortcutSet, rows: Tensor) -> ShortcutSet:
    return ShortcutSet(data.images[rows], data.labels[rows], data.boxes[rows], data.index[rows])


def _compute(scfg: ShortcutConfig, cfg: SuiteConfig) -> dict[str, Tensor]:
    """Fine-tune, fit, score: {"<set>/<detector>": scores, "accuracy/<set>": (1,), "sizes": (3,)}."""
    setup = prepare(scfg)
    model, n = setup.model, len(setup.fit)
    if not 2 <= cfg.n_calibration <= n - 2:
        raise ValueError(f"n_calibration must be in [2, {n - 2}] for the shortcut model's {n} fit images; got {cfg.n_calibration}")
    fit = _rows(setup.fit, torch.arange(n - cfg.n_calibration)[: cfg.max_train])
    calibration = _rows(setup.fit, torch.arange(n - cfg.n_calibration, n))
    detectors = {
        **patch_detectors(model, scfg.layers, covariance=cfg.covariance),
        **baseline_detectors(model, cfg.baselines, fc_layer=scfg.fc_layer),
    }
    holdout = float_batches(setup.hold, cfg.batch_size)
    fit_detectors(list(detectors.values()), float_batches(fit, cfg.batch_size), holdout=holdout, progress=cfg.progress)
    if cfg.mixture:
        add_mixture(detectors, holdout, progress=cfg.progress)
    tests = shortcut_test_sets(
        *setup.test, classes=setup.classes, marker=setup.marker, p_marked=scfg.p_marked, p_other=scfg.p_other,
        seed=scfg.seed + 200,  # as bench shortcut draws its test markers
    )
    sets = {"calibration": calibration, "clean": tests.clean, "moved": tests.moved, "removed": tests.removed}
    out = {"sizes": torch.tensor([len(fit), len(setup.hold), len(calibration)])}
    for name, data in sets.items():
        x = data.float()
        got = score_detectors(detectors, x, batch_size=cfg.batch_size, progress=cfg.progress)
        out.update({f"{name}/{det}": s for det, (s, _) in got.items()})
        out[f"accuracy/{name}"] = torch.tensor([accuracy(model, x, data.labels, batch_size=cfg.batch_size)])
    return out


def run_shortcut_model(root: Path, cfg: SuiteConfig, cache: TensorCache, train_key: dict) -> dict:
    """Score the shortcut model (from the cache when possible); its JSON-ready results.

    Parameters
    ----------
    root : Path
        Data root.
    cfg : SuiteConfig
    cache : TensorCache
    train_key : dict
        Content fingerprint of the CIFAR-10 training set (part of the cache key).
    """
    scfg = shortcut_config(cfg, root)
    base = load_cifar_model(root, scfg.model, "cpu")
    test = load_set("cifar10_test", root, progress=cfg.progress)
    parts = {
        "recipe": {k: v for k, v in asdict(scfg).items() if k not in _NOT_IN_KEY},
        "base_weights": parameter_sha256(base),
        "train": train_key,
        "test": {"images": tensor_sha256(test.images), "labels": tensor_sha256(test.labels)},
        "n_calibration": cfg.n_calibration, "max_train": cfg.max_train, "mixture": cfg.mixture,
    }
    computed: list[bool] = []

    def compute() -> dict[str, Tensor]:
        computed.append(True)
        return _compute(scfg, cfg)

    tensors = cache.get("shortcut", parts, compute)
    scores = {name: {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith(f"{name}/")} for name in _SETS}
    cal = scores["calibration"]
    clean = with_fused(scores["clean"], cal)
    n_fit, n_holdout, n_calibration = (int(v) for v in tensors["sizes"])
    return {
        "model": f"{scfg.model} (shortcut)",
        "recipe": asdict(scfg),
        "accuracy": {name: tensors[f"accuracy/{name}"].item() for name in _SETS if name != "calibration"},
        "n_fit": n_fit, "n_holdout": n_holdout, "n_calibration": n_calibration,
        "n_images": {name: len(next(iter(scores[name].values()))) for name in _SETS},
        "metrics": {
            "shortcut_moved": category_metrics(clean, with_fused(scores["moved"], cal)),
            "shortcut_removed": category_metrics(clean, with_fused(scores["removed"], cal)),
        },
        "fitted_this_run": bool(computed),
    }
