"""The embedded demo: everything end to end on scikit-learn's digits, no download.

Train a small CNN on the digits (16x16), fit Simple and Class patch-Mahalanobis detectors on
three layers next to logit and feature baselines, then measure how well each flags
(a) out-of-distribution sets built from data that ships locally (crops of scikit-learn's sample
photographs, uniform and Gaussian noise, inverted digits) and (b) FGSM and PGD adversarial
examples. Writes ``results.json``, ``results.md``, ROC curves and score histograms.

Detector hyperparameters are fixed in :class:`DemoConfig` before any shifted data is seen;
layer scores are standardized on the validation split (in-distribution only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from covguard.attacks import FGSM, PGD, success_mask
from covguard.data import load_digits_split, ood_sets
from covguard.detectors import ClassMahalanobis, Detector, PatchMahalanobis, SimpleMahalanobis
from covguard.detectors.baselines import BASELINES
from covguard.metrics import DetectionMetrics, evaluate
from covguard.models import SmallCNN
from covguard.html_report import add_html_report
from covguard.report import markdown_table, plot_histograms, plot_roc, write_json
from covguard.train import evaluate_accuracy, train_classifier

__all__ = ["DemoConfig", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the defaults are what ``covguard demo`` runs."""

    seed: int = 0  # data split, training, noise sets and attack random starts
    size: int = 16  # digits upsampled from 8x8 to size x size
    epochs: int = 30  # classifier training epochs
    layers: tuple[str, ...] = ("block1", "block2", "block3")  # tapped SmallCNN stages
    covariance: str = "full"  # patch covariance form of our detectors
    attack_eps: float = 0.1  # L-inf budget in [0, 1] pixel units (MNIST-style budget)
    pgd_steps: int = 20  # PGD iterations, step eps/4, random start
    baselines: tuple[str, ...] = ("msp", "energy", "max_logit", "mds", "knn")  # keys of BASELINES
    max_test: int | None = None  # cap on test images (reduced runs); None = all
    batch_size: int = 128
    progress: bool = True


@dataclass
class DemoResult:
    """Everything the demo measured, as written to ``results.json``."""

    config: dict
    test_accuracy: float
    metrics: dict[str, dict[str, DetectionMetrics]]  # set -> detector -> metrics
    layer_auroc: dict[str, dict[str, dict[str, float]]]  # set -> detector -> layer -> AUROC
    attack_success_rate: dict[str, float]
    n_attacked: dict[str, int]  # correctly classified test images behind each attack's rates
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _detectors(model: nn.Module, cfg: DemoConfig) -> dict[str, Detector]:
    """Our patch detectors and the configured baselines, by display name."""
    common = {"layers": cfg.layers, "covariance": cfg.covariance, "fit_positions": 1.0}
    dets: dict[str, Detector] = {
        "simple_mahalanobis": SimpleMahalanobis(model, **common),
        "class_mahalanobis_top1": ClassMahalanobis(model, scoring="top1", **common),
        "class_mahalanobis_mixture": ClassMahalanobis(model, scoring="mixture", top_m=3, **common),
    }
    unknown = [name for name in cfg.baselines if name not in BASELINES]
    if unknown:
        raise ValueError(f"baselines {unknown} are unknown; choose from {sorted(BASELINES)}")
    for name in cfg.baselines:
        dets[name] = BASELINES[name](model)
    return dets


def _shifted_sets(
    model: nn.Module, x_test: Tensor, y_test: Tensor, cfg: DemoConfig
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, float], dict[str, int]]:
    """(clean, shifted) image pairs per evaluation set, and each attack's success rate.

    OOD sets are scored against all test images. An attack's positives are its successful
    adversarials of correctly classified test images, its negatives the same clean images.
    """
    sets = {name: (x_test, x) for name, x in ood_sets(x_test, seed=cfg.seed).items()}
    with torch.no_grad():
        correct = model(x_test).argmax(1) == y_test
    xc, yc = x_test[correct], y_test[correct]
    gen = torch.Generator().manual_seed(cfg.seed)
    attacks: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "fgsm": FGSM(model, eps=cfg.attack_eps),
        "pgd": PGD(model, eps=cfg.attack_eps, alpha=cfg.attack_eps / 4, steps=cfg.pgd_steps, generator=gen),
    }
    success_rate, n_attacked = {}, {}
    for name, attack in attacks.items():
        x_adv = torch.cat([attack(xc[i : i + cfg.batch_size], yc[i : i + cfg.batch_size]) for i in range(0, len(xc), cfg.batch_size)])
        ok = success_mask(model, x_adv, yc)
        success_rate[name], n_attacked[name] = ok.float().mean().item(), len(xc)
        if ok.sum() < 2:
            logger.warning("attack %s succeeded on %d images; set skipped", name, int(ok.sum()))
            continue
        sets[name] = (xc[ok], x_adv[ok])
    return sets, success_rate, n_attacked


def _scores(det: Detector, x: Tensor, batch_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Combined scores (N,) and, for patch detectors, each layer's scores {layer: (N,)}."""
    if not isinstance(det, PatchMahalanobis):
        return torch.cat([det.score(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)]), {}
    layer_scores = torch.cat([det.layer_scores(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)])
    return det.combine(layer_scores), {layer: layer_scores[:, i] for i, layer in enumerate(det.layers)}


def run_demo(out: str | Path, config: DemoConfig = DemoConfig()) -> DemoResult:
    """Run the demo and write its report folder.

    Parameters
    ----------
    out : str or Path
        Report folder (created): ``results.json``, ``results.md``, ``roc_<set>.png``,
        ``hist_<set>.png``.
    config : DemoConfig

    Returns
    -------
    DemoResult
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    torch.manual_seed(config.seed)
    split = load_digits_split(size=config.size, seed=config.seed)
    model = SmallCNN(in_channels=1, num_classes=len(split.classes))
    train_classifier(model, split.train, epochs=config.epochs, seed=config.seed, progress=config.progress)
    model.eval()
    accuracy = evaluate_accuracy(model, split.test)
    seconds["train"] = time.perf_counter() - tic
    logger.info("test accuracy %.4f", accuracy)

    tic = time.perf_counter()
    train_loader = DataLoader(split.train, batch_size=config.batch_size)
    val_loader = DataLoader(split.val, batch_size=config.batch_size)
    detectors = _detectors(model, config)
    for det in detectors.values():
        if isinstance(det, PatchMahalanobis):
            det.fit(train_loader, holdout=val_loader, progress=config.progress)
        elif det.requires_fit:
            det.fit(train_loader, progress=config.progress)
    seconds["fit"] = time.perf_counter() - tic

    tic = time.perf_counter()
    x_test, y_test = split.test.tensors
    if config.max_test is not None:
        x_test, y_test = x_test[: config.max_test], y_test[: config.max_test]
    sets, success_rate, n_attacked = _shifted_sets(model, x_test, y_test, config)
    seconds["attacks"] = time.perf_counter() - tic

    tic = time.perf_counter()
    metrics: dict[str, dict[str, DetectionMetrics]] = {}
    layer_auroc: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, (clean, shifted) in sets.items():
        metrics[set_name], layer_auroc[set_name], curves = {}, {}, {}
        for det_name, det in detectors.items():
            (s_in, l_in), (s_out, l_out) = _scores(det, clean, config.batch_size), _scores(det, shifted, config.batch_size)
            metrics[set_name][det_name] = evaluate(s_in, s_out)
            curves[det_name] = (s_in, s_out)
            if l_in:
                layer_auroc[set_name][det_name] = {layer: evaluate(l_in[layer], l_out[layer]).auroc for layer in det.layers}
        plot_roc(curves, out / f"roc_{set_name}.png", title=f"ROC: digits test vs {set_name}")
        s_in, s_out = curves["class_mahalanobis_top1"]
        plot_histograms(
            s_in, s_out, out / f"hist_{set_name}.png", label_in="digits (test)", label_out=set_name,
            title=f"class_mahalanobis_top1 scores: {set_name}",
        )
    seconds["evaluate"] = time.perf_counter() - tic

    result = DemoResult(
        config={**asdict(config), "layers": list(config.layers), "baselines": list(config.baselines)},
        test_accuracy=accuracy,
        metrics=metrics,
        layer_auroc=layer_auroc,
        attack_success_rate=success_rate,
        n_attacked=n_attacked,
        seconds=seconds,
    )
    write_json(result, out / "results.json")
    (out / "results.md").write_text(render_markdown(result))
    add_html_report(out)
    return result


def render_markdown(result: DemoResult) -> str:
    """The demo's tables: AUROC and FPR@95%TPR per detector and set, and per-layer AUROC."""
    sets = list(result.metrics)
    detectors = list(next(iter(result.metrics.values())))
    lines = [
        "# covguard demo: digits",
        "",
        f"Small CNN test accuracy: {result.test_accuracy:.4f}. "
        + "Attack success rates (eps={eps}): ".format(eps=result.config["attack_eps"])
        + ", ".join(f"{k} {v:.3f} of {result.n_attacked[k]}" for k, v in result.attack_success_rate.items())
        + ".",
        "",
    ]
    for title, key in (("AUROC (higher is better)", "auroc"), ("FPR at 95% TPR (lower is better)", "fpr_at_95tpr")):
        rows = [{"detector": d, **{s: getattr(result.metrics[s][d], key) for s in sets}} for d in detectors]
        lines += [f"## {title}", "", markdown_table(rows, ["detector", *sets]), ""]
    rows = [
        {"set": s, "detector": d, **aurocs}
        for s, per_det in result.layer_auroc.items()
        for d, aurocs in per_det.items()
    ]
    layers = result.config["layers"]
    lines += ["## Per-layer AUROC of the patch detectors", "", markdown_table(rows, ["set", "detector", *layers]), ""]
    return "\n".join(lines)
