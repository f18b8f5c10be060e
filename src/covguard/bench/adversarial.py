"""Adversarial-example detection on CIFAR-10 with the shared pretrained ResNets.

Protocol (issue 3, DESIGN.md section 4):

- Detectors are fitted on the CIFAR-10 training set only, minus ``n_holdout`` images held out
  (seeded) to standardize the layer scores of multi-layer detectors. Nothing is tuned on
  adversarial data: every hyperparameter is fixed in :class:`AdversarialConfig` beforehand.
- ``n_images`` test images are drawn with a fixed seed; those the model classifies correctly
  are attacked. Positives are the successful adversarials, negatives the same clean images.
  ``mix`` assigns each clean image to one attack (seeded round robin) and keeps its adversarial.
- Budgets are in [0, 1] pixel units; models normalize internally, so the budget never sees
  the normalization.
- Optional budget sweep (``sweep_eps``): the same clean images attacked again at each L-inf
  budget with ``sweep_attacks``, scored by the same fitted detectors.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.attacks import ATTACKS, success_mask
from covguard.bench.common import (
    CIFAR_LAYERS, accuracy, fit_on_train, format_mean_std, load_cifar_model, mean_std, predict, weights_description,
)
from covguard.data.registry import load_set
from covguard.detectors.multi import score_detectors
from covguard.metrics import evaluate
from covguard.html_report import add_html_report
from covguard.report import markdown_table, plot_histograms, plot_roc, write_json

__all__ = ["AdversarialConfig", "run_adversarial", "render_markdown"]

logger = logging.getLogger(__name__)

#: Detector shown first in tables: fixed before any adversarial data was scored.
HEADLINE = "class_mahalanobis_top1"


@dataclass(frozen=True)
class AdversarialConfig:
    """Settings of the adversarial benchmark; defaults are the documented full run."""

    models: tuple[str, ...] = ("resnet20", "resnet32", "resnet44")
    attacks: tuple[str, ...] = ("fgsm", "bim", "pgd", "pgd_l2", "igm")  # keys of ATTACKS; "mix" is added
    eps: float = 8 / 255  # L-inf budget (pixels in [0, 1])
    eps_l2: float = 0.5  # L2 budget of pgd_l2
    steps: int = 10  # PGD / PGD-L2 / IGM iterations (BIM: Kurakin's rule)
    igm_scales: int = 8  # IGM: input scales averaged per integrated gradient
    n_images: int = 1000  # clean test images drawn (seeded); the correct ones are attacked
    n_holdout: int = 5000  # training images held out from fit to standardize layer scores
    max_train: int | None = None  # cap on fit images (reduced runs); None = all the rest
    covariance: str = "full"  # patch covariance form
    baselines: tuple[str, ...] = ("msp", "max_logit", "energy", "odin", "gen", "mds", "rmds", "knn", "vim", "react")
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"
    checkpoints: str = "original"  # "original" shared weights, or "finetuned" on the JPEG training set
    progress: bool = True
    sweep_eps: tuple[float, ...] = ()  # extra L-inf budgets (pixels in [0, 1]) for the budget sweep
    sweep_attacks: tuple[str, ...] = ("fgsm", "bim", "pgd")  # L-inf attacks run at every sweep budget


# Config fields that may differ between a saved report and a resumed run.
_RESUMABLE = {"models", "progress", "device", "batch_size", "sweep_eps", "sweep_attacks"}


def _attack(name: str, model: nn.Module, cfg: AdversarialConfig, gen: torch.Generator):
    if name not in ATTACKS:
        raise ValueError(f"attacks must be keys of {sorted(ATTACKS)}; got {name!r}")
    if name in ("fgsm", "bim"):
        return ATTACKS[name](model, eps=cfg.eps)
    if name == "pgd":
        return ATTACKS[name](model, eps=cfg.eps, alpha=2.5 * cfg.eps / cfg.steps, steps=cfg.steps, generator=gen)
    if name == "pgd_l2":
        return ATTACKS[name](model, eps=cfg.eps_l2, alpha=2.5 * cfg.eps_l2 / cfg.steps, steps=cfg.steps, generator=gen)
    return ATTACKS[name](model, eps=cfg.eps, alpha=2.5 * cfg.eps / cfg.steps, steps=cfg.steps, m=cfg.igm_scales, generator=gen)


def _craft(attack, x: Tensor, y: Tensor, cfg: AdversarialConfig, desc: str) -> Tensor:
    starts = tqdm(range(0, len(x), cfg.batch_size), desc=desc, unit="batch", disable=not cfg.progress, leave=False)
    bs, device = cfg.batch_size, cfg.device
    return torch.cat([attack(x[i : i + bs].to(device), y[i : i + bs].to(device)).cpu() for i in starts])


def _run_model(name: str, cfg: AdversarialConfig, root: Path, train, test) -> dict:
    """Fit, attack and score one checkpoint; returns its JSON-ready results and raw scores."""
    seconds = {}
    tic = time.perf_counter()
    model = load_cifar_model(root, name, cfg.device, checkpoints=cfg.checkpoints)
    x_test, y_test = test.float(), test.labels
    test_accuracy = accuracy(model, x_test, y_test)
    logger.info("%s: JPEG test accuracy %.4f", name, test_accuracy)

    detectors, sizes = fit_on_train(
        model, train, baselines=cfg.baselines, covariance=cfg.covariance, n_holdout=cfg.n_holdout,
        max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size, progress=cfg.progress,
    )
    seconds["fit"] = time.perf_counter() - tic

    tic = time.perf_counter()
    pick = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_images]
    x, y = x_test[pick], y_test[pick]
    correct = predict(model, x) == y
    x, y = x[correct], y[correct]
    adversarials, success = {}, {}
    for attack_name in cfg.attacks:
        attack = _attack(attack_name, model, cfg, torch.Generator().manual_seed(cfg.seed))
        adversarials[attack_name] = _craft(attack, x, y, cfg, f"{name} {attack_name}")
        success[attack_name] = success_mask(model, adversarials[attack_name].to(cfg.device), y.to(cfg.device)).cpu()
    assign = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed)) % len(cfg.attacks)  # (n,)
    stacked = torch.stack([adversarials[a] for a in cfg.attacks])  # (A, n, C, H, W)
    adversarials["mix"] = stacked[assign, torch.arange(len(x))]
    success["mix"] = torch.stack([success[a] for a in cfg.attacks])[assign, torch.arange(len(x))]
    seconds["attacks"] = time.perf_counter() - tic

    tic = time.perf_counter()
    clean_scores = score_detectors(detectors, x, batch_size=cfg.batch_size)
    metrics, layer_auroc, raw = {}, {}, {}
    for attack_name, x_adv in adversarials.items():
        ok = success[attack_name]
        if ok.sum() < 2:
            logger.warning("%s: attack %s succeeded on %d images; skipped", name, attack_name, int(ok.sum()))
            continue
        adv_scores = score_detectors(detectors, x_adv[ok], batch_size=cfg.batch_size)
        metrics[attack_name], layer_auroc[attack_name], raw[attack_name] = {}, {}, {}
        for det_name in detectors:
            (c_in, l_in), (c_out, l_out) = clean_scores[det_name], adv_scores[det_name]
            metrics[attack_name][det_name] = evaluate(c_in[ok], c_out).to_dict()
            raw[attack_name][det_name] = (c_in[ok], c_out)
            if l_in:
                layer_auroc[attack_name][det_name] = {k: evaluate(l_in[k][ok], l_out[k]).auroc for k in l_in}
                raw[attack_name][f"{det_name}/layers"] = {k: (l_in[k][ok], l_out[k]) for k in l_in}
    seconds["score"] = time.perf_counter() - tic
    tic = time.perf_counter()
    sweep = _sweep(name, model, detectors, x, y, clean_scores, cfg)
    if sweep:
        seconds["sweep"] = time.perf_counter() - tic
    result = {
        "test_accuracy": test_accuracy,
        "n_clean_correct": int(correct.sum()),
        "n_drawn": len(pick),
        **sizes,
        "attack_success_rate": {a: s.float().mean().item() for a, s in success.items()},
        "metrics": metrics,
        "layer_auroc": layer_auroc,
        "seconds": seconds,
        **({"sweep": sweep} if sweep else {}),
    }
    return {"result": result, "raw": raw}


def _sweep(name: str, model: nn.Module, detectors: dict, x: Tensor, y: Tensor, clean_scores: dict, cfg: AdversarialConfig) -> dict:
    """``{eps/255 label: {attack: {"success_rate", "auroc": {detector: AUROC}}}}`` over ``cfg.sweep_eps``."""
    sweep: dict = {}
    for eps in cfg.sweep_eps:
        label = f"{eps * 255:g}"
        sweep[label] = {}
        for attack_name in cfg.sweep_attacks:
            attack = _attack(attack_name, model, replace(cfg, eps=eps), torch.Generator().manual_seed(cfg.seed))
            x_adv = _craft(attack, x, y, cfg, f"{name} {attack_name} eps {label}/255")
            ok = success_mask(model, x_adv.to(cfg.device), y.to(cfg.device)).cpu()
            entry = {"success_rate": ok.float().mean().item(), "n_success": int(ok.sum()), "auroc": {}}
            if ok.sum() >= 2:
                adv_scores = score_detectors(detectors, x_adv[ok], batch_size=cfg.batch_size)
                entry["auroc"] = {d: evaluate(clean_scores[d][0][ok], adv_scores[d][0]).auroc for d in detectors}
            else:
                logger.warning("%s: %s at eps %s/255 succeeded on %d images; not scored", name, attack_name, label, int(ok.sum()))
            sweep[label][attack_name] = entry
    return sweep


def run_adversarial(
    root: str | Path, out: str | Path, config: AdversarialConfig = AdversarialConfig(), *, resume: bool = False
) -> dict:
    """Run the benchmark on every configured checkpoint and write the report folder.

    Parameters
    ----------
    root : str or Path
        Data root holding ``cifar10-jpeg/{train,test}.tar`` and ``models/resnet*.th``.
    out : str or Path
        Report folder: ``results.json``, ``results.md``, ``roc_<attack>.png``,
        ``hist_<attack>.png``.
    config : AdversarialConfig
    resume : bool
        Keep the checkpoints already in ``out/results.json`` (written with the same settings,
        apart from models, device, batch size and progress) and run only the missing ones.

    Returns
    -------
    dict
        What ``results.json`` holds.
    """
    root, out = Path(root), Path(out)
    if not 0 < config.eps:
        raise ValueError(f"eps must be > 0; got {config.eps}")
    if any(not 0 < e for e in config.sweep_eps):
        raise ValueError(f"sweep_eps must all be > 0; got {config.sweep_eps}")
    if unknown := set(config.sweep_attacks) - {"fgsm", "bim", "pgd", "igm"}:
        raise ValueError(f"sweep_attacks must be L-inf attacks (fgsm, bim, pgd, igm); got {sorted(unknown)}")
    if not config.attacks:
        raise ValueError("attacks must name at least one attack")
    out.mkdir(parents=True, exist_ok=True)
    train = load_set("cifar10_train", root, progress=config.progress)
    test = load_set("cifar10_test", root, progress=config.progress)
    results: dict = {"config": asdict(config), "models": {}}
    if resume:
        results["models"] = _resumable_models(out / "results.json", config)
    for name in config.models:
        if name in results["models"]:
            logger.info("%s: kept from %s (resume)", name, out / "results.json")
            continue
        run = _run_model(name, config, root, train, test)
        results["models"][name] = run["result"]
        if name == config.models[0]:
            _plots(run["raw"], out, name)
        # Written after every checkpoint, so a long run leaves a usable report at any point.
        write_json(results, out / "results.json")
        (out / "results.md").write_text(render_markdown(results))
        add_html_report(out)
    return results


def _resumable_models(path: Path, config: AdversarialConfig) -> dict:
    """Per-checkpoint results of a saved report whose settings match ``config``; {} if none."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    ours = json.loads(json.dumps(asdict(config)))  # tuples -> lists, as saved
    defaults = asdict(AdversarialConfig())  # a setting missing from an older report had its default
    differ = sorted(k for k in ours.keys() - _RESUMABLE if saved["config"].get(k, defaults.get(k)) != ours[k])
    if differ:
        raise ValueError(f"resume: {path} was written with other settings ({', '.join(differ)}); use another --out")
    return {name: result for name, result in saved["models"].items() if name in config.models}


def _plots(raw: dict, out: Path, model_name: str) -> None:
    """ROC curves of all detectors and the headline detector's best-layer histogram, per attack."""
    for attack, per_det in raw.items():
        curves = {k: v for k, v in per_det.items() if not k.endswith("/layers")}
        plot_roc(curves, out / f"roc_{attack}.png", title=f"{model_name}: clean vs {attack}")
        layers = per_det[f"{HEADLINE}/layers"]
        best = max(layers, key=lambda k: evaluate(*layers[k]).auroc)
        plot_histograms(
            *layers[best], out / f"hist_{attack}.png", label_in="clean", label_out=attack,
            title=f"{model_name} {HEADLINE}, best layer: {best}",
        )


def _table(results: dict, key: str, detectors: Sequence[str], attacks: Sequence[str]) -> str:
    models = list(results["models"].values())
    rows = []
    for det in detectors:
        row = {"detector": det}
        for attack in attacks:
            vals = [m["metrics"][attack][det][key] for m in models if attack in m["metrics"]]
            row[attack] = format_mean_std(vals) if vals else None
        rows.append(row)
    return markdown_table(rows, ["detector", *attacks])


def render_markdown(results: dict) -> str:
    """Tables: AUROC and FPR@95 (mean ± std over checkpoints, %), per-layer AUROC, success rates."""
    models = results["models"]
    first = next(iter(models.values()))
    attacks = [a for a in [*results["config"]["attacks"], "mix"] if any(a in m["metrics"] for m in models.values())]
    cfg = results["config"]
    # Ours first (headline leading), then the baselines in the configured order (JSON sorts keys).
    order = [HEADLINE, "class_mahalanobis_mixture", "simple_mahalanobis", "class_penultimate_original", *cfg["baselines"]]
    found = list(next(iter(first["metrics"].values())))
    detectors = [d for d in order if d in found] + sorted(set(found) - set(order))
    lines = [
        "# Adversarial detection on CIFAR-10 (JPEG copy)",
        "",
        f"Checkpoints: {', '.join(models)} ({weights_description(cfg)}); L-inf eps = {cfg['eps'] * 255:.0f}/255, L2 eps = {cfg['eps_l2']}; "
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
        "## AUROC (higher is better)",
        "",
        _table(results, "auroc", detectors, attacks),
        "",
        "## FPR at 95% TPR (lower is better)",
        "",
        _table(results, "fpr_at_95tpr", detectors, attacks),
        "",
        "## Per-layer AUROC of the patch detectors",
        "",
    ]
    rows = []
    for det in [d for d in detectors if d in first["layer_auroc"][attacks[0]]]:
        layers = first["layer_auroc"][attacks[0]][det]
        for layer in sorted(layers, key=lambda k: (CIFAR_LAYERS.index(k) if k in CIFAR_LAYERS else len(CIFAR_LAYERS), k)):
            row = {"detector": det, "layer": layer}
            for attack in attacks:
                vals = [m["layer_auroc"][attack][det][layer] for m in models.values() if attack in m["layer_auroc"]]
                row[attack] = format_mean_std(vals)
            rows.append(row)
    lines += [markdown_table(rows, ["detector", "layer", *attacks]), ""]
    mean_auroc = {
        det: mean_std([m["metrics"][a][det]["auroc"] for m in models.values() for a in attacks if a in m["metrics"]])[0]
        for det in detectors
    }
    best = max(mean_auroc, key=mean_auroc.get)
    lines += [f"Highest AUROC averaged over attacks and checkpoints: {best} ({mean_auroc[best] * 100:.1f}).", ""]
    return "\n".join(lines + _sweep_markdown(models, detectors))


def _sweep_markdown(models: dict, detectors: Sequence[str]) -> list[str]:
    """One AUROC table per swept attack: detectors x L-inf budgets (mean ± std over swept checkpoints)."""
    swept = {name: m["sweep"] for name, m in models.items() if m.get("sweep")}
    if not swept:
        return []
    budgets = sorted({b for s in swept.values() for b in s}, key=float)  # JSON keys are strings: "16" < "2"
    attacks = list(next(iter(swept.values()))[budgets[0]])
    lines = [
        "## AUROC against the L-inf budget",
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
