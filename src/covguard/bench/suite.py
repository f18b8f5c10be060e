"""``covguard bench suite``: one fitted guard per checkpoint, scored on every category we have.

Protocol (issue 13):

- Per CIFAR-10 checkpoint, every single detector (our patch detectors, the baselines) is fitted
  once on the training set, as in ``bench ood`` / ``bench adversarial``: ``n_holdout`` training
  images standardize layer scores; ``n_calibration`` other training images (a seeded split drawn
  first, :func:`~covguard.bench.suite_sets.calibration_split`) are kept out of both and give the
  fused detectors' calibration scores. Fit, holdout and calibration are disjoint; no test image
  calibrates anything.
- Categories (:meth:`SuiteConfig.categories`): near OOD (CIFAR-100, Tiny ImageNet), far OOD
  (MNIST, MNIST JPEG-matched), noise (uniform, Gaussian), blank frames (solid colours and
  near-constant ones), adversarial (FGSM, BIM, PGD, PGD-L2, IGM at 8/255, L2 0.5; FGSM and PGD
  at 2/255) and, with ``shortcut``, the moved and the removed marker on the shortcut model
  (:mod:`covguard.bench.suite_shortcut`).
- Negatives: the ``n_images`` drawn CIFAR-10 test images for the OOD, noise and blank
  categories; for an attack, the same clean images whose adversarial succeeded (the correctly
  classified ones are attacked, as in ``bench adversarial``); for the shortcut categories the
  test images marked as in training.
- Fused detectors (:data:`~covguard.bench.suite_config.FUSED_MEMBERS`, both rules, fixed in
  advance): each member's score becomes a conformal p-value against its calibration scores
  with an exponential tail (:mod:`covguard.pvalues`, as :class:`~covguard.detectors.fused.FusedDetector`
  does), combined by the rule (:func:`fuse`). Fused scores are computed from the members'
  cached scores; no forward pass.
- Metrics per (detector, category): AUROC, and the detection rate at 5 % FPR read on the test
  negatives themselves (the fraction of shifted inputs above the threshold that flags 5 % of the
  negatives: ``1 - fpr_at_95tpr``), as a benchmark table reports it; no threshold is carried
  over from calibration data. Mean and worst over categories: :mod:`covguard.bench.suite_report`.
- Cost: per fused member set, the fused detector's scoring time next to each member's alone,
  on ``timing_images`` test images, medians of interleaved repeats (target <= 1.2x the costliest).
- Caching (:mod:`covguard.bench.cache`): each set's scores by every detector, and each attack's
  images, keyed by the checkpoint weights' SHA-256, the content SHA-256 of the training and
  evaluated images and the settings. A run whose scores are all cached fits nothing.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from covguard.attacks import success_mask
from covguard.bench.cache import TensorCache, tensor_sha256
from covguard.bench.common import fit_on_train, load_cifar_model, predict
from covguard.bench.suite_config import DERIVED, SuiteConfig, fused_detectors
from covguard.bench.suite_metrics import category_metrics, time_fused, with_fused
from covguard.bench.suite_report import write_report
from covguard.bench.suite_shortcut import run_shortcut_model
from covguard.bench.suite_sets import attack_settings, build_attack, calibration_split, craft, eval_sets
from covguard.data.registry import load_set
from covguard.detectors import Detector
from covguard.detectors.multi import score_detectors
from covguard.features import parameter_sha256

__all__ = ["LazyDetectors", "run_suite"]

logger = logging.getLogger(__name__)


class LazyDetectors:
    """Detectors fitted on first use only: a run whose scores are all cached never fits.

    Parameters
    ----------
    fit : callable
        Returns the fitted detectors {name: Detector}.
    """

    def __init__(self, fit: Callable[[], dict[str, Detector]]) -> None:
        self._fit = fit
        self._detectors: dict[str, Detector] | None = None
        self.seconds = 0.0  # time spent fitting

    @property
    def fitted(self) -> bool:
        return self._detectors is not None

    def get(self) -> dict[str, Detector]:
        if self._detectors is None:
            tic = time.perf_counter()
            self._detectors = self._fit()
            self.seconds = time.perf_counter() - tic
        return self._detectors


def _timing_tensors(timing: dict) -> dict[str, Tensor]:
    return {f"{name}/{k}": torch.tensor([s], dtype=torch.float64) for name, t in timing.items() for k, s in t["seconds"].items()}


def _timing_from_tensors(tensors: Mapping[str, Tensor]) -> dict:
    out: dict = {}
    for key, t in tensors.items():
        name, k = key.split("/", 1)
        out.setdefault(name, {"seconds": {}})["seconds"][k] = t.item()
    for name, entry in out.items():
        members = [k for k in entry["seconds"] if k != "fused"]
        entry["costliest"] = max(members, key=entry["seconds"].get)
        entry["ratio"] = entry["seconds"]["fused"] / entry["seconds"][entry["costliest"]]
    return out


def _images(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _attack_set(model: nn.Module, name: str, eps: float, x: Tensor, y: Tensor, cfg: SuiteConfig, desc: str) -> dict[str, Tensor]:
    attack = build_attack(name, model, eps, cfg, torch.Generator().manual_seed(cfg.seed))
    x_adv = craft(attack, x, y, cfg, desc)
    return {"x_adv": x_adv, "success": success_mask(model, x_adv.to(cfg.device), y.to(cfg.device)).cpu()}


def _run_checkpoint(name: str, cfg: SuiteConfig, root: Path, data: dict, cache: TensorCache) -> dict:
    """Fit (or read from the cache), attack and score one checkpoint; its JSON-ready results."""
    hits, misses = cache.hits, cache.misses
    tic = time.perf_counter()
    model = load_cifar_model(root, name, cfg.device, checkpoints=cfg.checkpoints)
    key = {"model": name, "weights": parameter_sha256(model), "train": data["train_key"], "fit": cfg.fit_settings()}
    lazy = LazyDetectors(lambda: fit_on_train(
        model, data["rest"], baselines=cfg.baselines, covariance=cfg.covariance, n_holdout=cfg.n_holdout,
        max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size, mixture=cfg.mixture,
        derived={name: DERIVED[name] for name in cfg.derived}, progress=cfg.progress,
    )[0])

    def scores(images: Tensor) -> dict[str, Tensor]:
        def compute() -> dict[str, Tensor]:
            got = score_detectors(lazy.get(), _images(images), batch_size=cfg.batch_size, progress=cfg.progress)
            return {det: s for det, (s, _) in got.items()}

        return cache.get("scores", {**key, "set": tensor_sha256(images)}, compute)

    sets = data["sets"]
    cal = scores(data["calibration"].images)
    x_id, y_id = _images(sets.id_images), sets.id_labels
    correct = predict(model, x_id, batch_size=cfg.batch_size) == y_id
    id_scores = scores(sets.id_images)
    id_fused = with_fused(id_scores, cal)
    metrics = {cat: category_metrics(id_fused, with_fused(scores(images), cal)) for cat, images in sets.ood.items()}
    seconds = {"ood": time.perf_counter() - tic}

    tic = time.perf_counter()
    x_att, y_att = x_id[correct], y_id[correct]
    clean_key = {"model": name, "weights": key["weights"], "clean": tensor_sha256(x_att), "labels": tensor_sha256(y_att)}
    success = {}
    for cat, (attack, eps) in cfg.attack_categories().items():
        if len(x_att) == 0:
            warnings.warn(f"{name}: no correctly classified test image to attack; {cat} skipped", RuntimeWarning, stacklevel=2)
            continue
        adv = cache.get(
            "attacks", {**clean_key, **attack_settings(attack, eps, cfg)},
            lambda attack=attack, eps=eps, cat=cat: _attack_set(model, attack, eps, x_att, y_att, cfg, f"{name} {cat}"),
        )
        ok = adv["success"].bool()
        success[cat] = ok.float().mean().item()
        if ok.sum() < 2:
            logger.warning("%s: %s succeeded on %d images; not scored", name, cat, int(ok.sum()))
            continue
        clean = {det: s[correct][ok] for det, s in id_scores.items()}
        metrics[cat] = category_metrics(with_fused(clean, cal), with_fused(scores(adv["x_adv"][ok]), cal))
    seconds["attacks"] = time.perf_counter() - tic

    timing_key = {**key, "set": tensor_sha256(sets.id_images), "timing": [cfg.timing_images, cfg.timing_repeats]}
    timing = _timing_from_tensors(cache.get("timing", timing_key, lambda: _timing_tensors(
        time_fused(lazy.get(), cal, x_id[: cfg.timing_images], repeats=cfg.timing_repeats))))
    seconds["fit"] = lazy.seconds
    n_rest = len(data["rest"])
    n_fit = n_rest - cfg.n_holdout if cfg.max_train is None else min(cfg.max_train, n_rest - cfg.n_holdout)
    return {
        "weights_sha256": key["weights"],
        "id_accuracy": correct.float().mean().item(),
        "n_fit": n_fit, "n_holdout": cfg.n_holdout, "n_calibration": len(data["calibration"]),
        "n_attacked": len(x_att),
        "attack_success_rate": success,
        "metrics": metrics,
        "timing": timing,
        "seconds": seconds,
        "fitted_this_run": lazy.fitted,
        "cache": {"hits": cache.hits - hits, "misses": cache.misses - misses},
    }


def run_suite(root: str | Path, out: str | Path, config: SuiteConfig = SuiteConfig()) -> dict:
    """Run the suite on every configured checkpoint (and the shortcut model) and write the report.

    Parameters
    ----------
    root : str or Path
        Data root with ``cifar10-jpeg/``, ``cifar100-jpeg.tar``, ``tiny-imagenet-200-val.tar``,
        ``mnist/`` and ``models/``.
    out : str or Path
        Report folder: ``results.json`` and ``results.md`` (rewritten after every checkpoint),
        ``heatmap_auroc.png``, ``heatmap_detection.png``, ``report.html``.
    config : SuiteConfig

    Returns
    -------
    dict
        What ``results.json`` holds.
    """
    config.check()
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = TensorCache(config.cache_dir, enabled=config.cache)
    train = load_set("cifar10_train", root, progress=config.progress)
    rest, calibration = calibration_split(train, config.n_calibration, config.seed)
    data = {
        "train_key": {"images": tensor_sha256(train.images), "labels": tensor_sha256(train.labels)},
        "rest": rest, "calibration": calibration, "sets": eval_sets(root, config),
    }
    results: dict = {
        "config": asdict(config),
        "categories": config.categories(),
        "fused": {name: {"members": list(m), "rule": rule} for name, (m, rule) in fused_detectors().items()},
        "n_images": {"cifar10_test": len(data["sets"].id_images), **{k: len(v) for k, v in data["sets"].ood.items()}},
        "cache_dir": str(cache.folder) if config.cache else None,
        "models": {},
    }
    for name in config.models:
        results["models"][name] = _run_checkpoint(name, config, root, data, cache)
        write_report(results, out)  # after every checkpoint: a stopped run keeps what it finished
    if config.shortcut:
        results["shortcut"] = run_shortcut_model(root, config, cache, data["train_key"])
        write_report(results, out)
    return results
