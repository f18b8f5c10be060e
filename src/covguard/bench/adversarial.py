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
- ``protocol="validation"`` (or ``"both"``, next to the fixed one): each method's configuration is
  chosen on ID-val (CIFAR-10 test images, then removed from the pool the attacked images are
  drawn from) vs OOD-val (Tiny ImageNet classes), as in ``bench ood``
  (:mod:`covguard.bench.validation`); attacks never choose.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.attacks import ATTACKS, success_mask
from covguard.bench.adversarial_report import HEADLINE, render_markdown
from covguard.bench.common import OWN_FIT_VARIANTS, accuracy, fit_on_train, predict, split_train
from covguard.bench.own_data import CifarCheckpoints
from covguard.bench.validation import ValidationSplit, check_protocol, choose_and_score, grid_clones, report_config, validation_split
from covguard.data.registry import load_set
from covguard.detectors.multi import score_detectors
from covguard.metrics import evaluate
from covguard.html_report import add_html_report
from covguard.report import plot_histograms, plot_roc, write_json

__all__ = ["AdversarialConfig", "run_adversarial", "render_markdown"]

logger = logging.getLogger(__name__)


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
    protocol: str = "fixed"  # "fixed" in advance, "validation" (OpenOOD v1.5: chosen on ID-val vs OOD-val), "both"
    n_id_val: int = 1000  # validation: CIFAR-10 test images held out as ID-val (seeded)
    n_ood_val_classes: int = 20  # validation: Tiny ImageNet classes held out as OOD-val (seeded)


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


def _run_model(name: str, cfg: AdversarialConfig, models, train, test, split: ValidationSplit | None) -> dict:
    """Fit, attack and score one checkpoint; returns its JSON-ready results and raw scores."""
    seconds = {}
    tic = time.perf_counter()
    model, taps = models.load(name, cfg.device, len(train.classes) or None)
    x_test, y_test = test.float(), test.labels
    test_accuracy = accuracy(model, x_test, y_test)
    logger.info("%s: JPEG test accuracy %.4f", name, test_accuracy)

    clones = grid_clones(taps.baselines_of(model, cfg.baselines)) if split is not None else {}
    detectors, sizes = fit_on_train(
        model, train, baselines=cfg.baselines, covariance=cfg.covariance, n_holdout=cfg.n_holdout,
        max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size, keep_moments=split is not None,
        also_fit=list(clones.values()), own_fit=OWN_FIT_VARIANTS if split is not None else {}, progress=cfg.progress,
        taps=taps,
    )
    own = {name: detectors.pop(name) for name in OWN_FIT_VARIANTS if name in detectors}  # validation grid points
    seconds["fit"] = time.perf_counter() - tic

    tic = time.perf_counter()
    pool = torch.arange(len(x_test)) if split is None else split.id_test_index  # fixed: pool[perm] is perm itself
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_images]]
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

    scorers, clean, blocks, raw = {}, {}, {}, {}
    if "fixed" in check_protocol(cfg.protocol):
        tic = time.perf_counter()
        scorers["fixed"] = lambda images: score_detectors(detectors, images, batch_size=cfg.batch_size)
        clean["fixed"] = scorers["fixed"](x)
        blocks["fixed"], raw = _score_attacks(name, scorers["fixed"], clean["fixed"], adversarials, success)
        seconds["score"] = time.perf_counter() - tic
    if split is not None:
        tic = time.perf_counter()
        _, hold = split_train(train, n_holdout=cfg.n_holdout, max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size)
        selection, scorers["validation"] = choose_and_score({**detectors, **own}, clones, split, hold,
                                                            batch_size=cfg.batch_size, progress=cfg.progress)
        clean["validation"] = scorers["validation"](x)
        block, raw_chosen = _score_attacks(name, scorers["validation"], clean["validation"], adversarials, success)
        blocks["validation"] = {"selection": selection, "metrics": block["metrics"]}
        raw = raw or raw_chosen
        seconds["validation"] = time.perf_counter() - tic
    tic = time.perf_counter()
    for protocol, sweep in _sweep(name, model, scorers, clean, x, y, cfg).items():
        blocks[protocol]["sweep"] = sweep
        seconds["sweep"] = time.perf_counter() - tic
    fixed = blocks.pop("fixed", {})
    sweep = fixed.pop("sweep", None)
    result = {
        "test_accuracy": test_accuracy,
        "n_clean_correct": int(correct.sum()),
        "n_drawn": len(pick),
        **sizes,
        "attack_success_rate": {a: s.float().mean().item() for a, s in success.items()},
        **fixed,
        "seconds": seconds,
        **({"sweep": sweep} if sweep else {}),
        **blocks,
    }
    return {"result": result, "raw": raw}


def _score_attacks(name: str, scorer: Callable, clean_scores: dict, adversarials: dict, success: dict) -> tuple[dict, dict]:
    """``{"metrics", "layer_auroc"}`` per attack and detector (clean vs successful adversarials), and raw scores."""
    metrics, layer_auroc, raw = {}, {}, {}
    for attack_name, x_adv in adversarials.items():
        ok = success[attack_name]
        if ok.sum() < 2:
            logger.warning("%s: attack %s succeeded on %d images; skipped", name, attack_name, int(ok.sum()))
            continue
        adv_scores = scorer(x_adv[ok])
        metrics[attack_name], layer_auroc[attack_name], raw[attack_name] = {}, {}, {}
        for det_name in clean_scores:
            (c_in, l_in), (c_out, l_out) = clean_scores[det_name], adv_scores[det_name]
            metrics[attack_name][det_name] = evaluate(c_in[ok], c_out).to_dict()
            raw[attack_name][det_name] = (c_in[ok], c_out)
            if l_in:
                layer_auroc[attack_name][det_name] = {k: evaluate(l_in[k][ok], l_out[k]).auroc for k in l_in}
                raw[attack_name][f"{det_name}/layers"] = {k: (l_in[k][ok], l_out[k]) for k in l_in}
    return {"metrics": metrics, "layer_auroc": layer_auroc}, raw


def _sweep(name: str, model: nn.Module, scorers: dict[str, Callable], clean: dict, x: Tensor, y: Tensor, cfg: AdversarialConfig) -> dict:
    """``{protocol: {eps/255 label: {attack: {"success_rate", "auroc": {detector: AUROC}}}}}`` over ``cfg.sweep_eps``;
    each budget's adversarials are crafted once and scored under every protocol's ``scorers`` (``clean``: their scores of ``x``)."""
    if not cfg.sweep_eps:
        return {}
    sweeps: dict = {protocol: {} for protocol in scorers}
    for eps in cfg.sweep_eps:
        label = f"{eps * 255:g}"
        for attack_name in cfg.sweep_attacks:
            attack = _attack(attack_name, model, replace(cfg, eps=eps), torch.Generator().manual_seed(cfg.seed))
            x_adv = _craft(attack, x, y, cfg, f"{name} {attack_name} eps {label}/255")
            ok = success_mask(model, x_adv.to(cfg.device), y.to(cfg.device)).cpu()
            if ok.sum() < 2:
                logger.warning("%s: %s at eps %s/255 succeeded on %d images; not scored", name, attack_name, label, int(ok.sum()))
            for protocol, scorer in scorers.items():
                entry = {"success_rate": ok.float().mean().item(), "n_success": int(ok.sum()), "auroc": {}}
                if ok.sum() >= 2:
                    adv_scores = scorer(x_adv[ok])
                    entry["auroc"] = {d: evaluate(clean[protocol][d][0][ok], adv_scores[d][0]).auroc for d in adv_scores}
                sweeps[protocol].setdefault(label, {})[attack_name] = entry
    return sweeps


def run_adversarial(
    root: str | Path | None, out: str | Path, config: AdversarialConfig = AdversarialConfig(), *, resume: bool = False,
    models=None, data=None,
) -> dict:
    """Run the benchmark on every configured checkpoint and write the report folder.

    Parameters
    ----------
    root : str or Path, optional
        Data root holding ``cifar10-jpeg/{train,test}.tar`` and ``models/resnet*.th``; not read when
        ``models`` and ``data`` are both given.
    out : str or Path
        Report folder: ``results.json``, ``results.md``, ``roc_<attack>.png``,
        ``hist_<attack>.png``.
    config : AdversarialConfig
    resume : bool
        Keep the checkpoints already in ``out/results.json`` (written with the same settings,
        apart from models, device, batch size and progress) and run only the missing ones.
    models : model source, optional
        ``load(name, device, n_classes) -> (model, taps)`` for the names of ``config.models``
        (:class:`~covguard.bench.own_data.OwnCheckpoints`); default: the CIFAR ResNets of ``root``.
    data : OwnSets, optional
        Own ID training and test sets (:mod:`covguard.bench.own_data`; fixed protocol only); default:
        CIFAR-10 of ``root``.

    Returns
    -------
    dict
        What ``results.json`` holds.
    """
    out = Path(out)
    if not 0 < config.eps:
        raise ValueError(f"eps must be > 0; got {config.eps}")
    if any(not 0 < e for e in config.sweep_eps):
        raise ValueError(f"sweep_eps must all be > 0; got {config.sweep_eps}")
    if unknown := set(config.sweep_attacks) - {"fgsm", "bim", "pgd", "igm"}:
        raise ValueError(f"sweep_attacks must be L-inf attacks (fgsm, bim, pgd, igm); got {sorted(unknown)}")
    if not config.attacks:
        raise ValueError("attacks must name at least one attack")
    if data is not None and config.protocol != "fixed":
        raise ValueError("--protocol validation holds out Tiny ImageNet classes as OOD-val: it runs on the default sets only, "
                         "not with --id-train / --id-test")
    models = models or CifarCheckpoints(Path(root), config.checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        train, test = load_set("cifar10_train", root, progress=config.progress), load_set("cifar10_test", root, progress=config.progress)
    else:
        train = data.train(config.progress)
        test = data.test(train.classes, config.progress)
    split = None
    if "validation" in check_protocol(config.protocol):
        tin = load_set("tin", root, progress=config.progress)
        split = validation_split(test, tin, n_id_val=config.n_id_val, n_ood_val_classes=config.n_ood_val_classes, seed=config.seed)
    results: dict = {"config": report_config(config), **({"validation_split": split.describe()} if split else {}),
                     **(data.describe() if data is not None else {}), **models.describe(), "models": {}}
    if resume:
        results["models"] = _resumable_models(out / "results.json", config)
    kept = set(results["models"])
    for name in config.models:
        if name in results["models"]:
            logger.info("%s: kept from %s (resume)", name, out / "results.json")
            continue
        run = _run_model(name, config, models, train, test, split)
        results["models"][name] = run["result"]
        if name == config.models[0]:
            _plots(run["raw"], out, name)
        _write_report(results, out)  # after every checkpoint: a long run leaves a usable report at any point
    if all(name in kept for name in config.models):  # nothing ran: the kept checkpoints' report, re-rendered
        _write_report(results, out)
    return results


def _write_report(results: dict, out: Path) -> None:
    write_json(results, out / "results.json")
    (out / "results.md").write_text(render_markdown(results))
    add_html_report(out)


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
    """ROC curves of all detectors and the headline detector's best-layer histogram, per attack
    (validation protocol alone: the chosen class method's score)."""
    for attack, per_det in raw.items():
        curves = {k: v for k, v in per_det.items() if not k.endswith("/layers")}
        plot_roc(curves, out / f"roc_{attack}.png", title=f"{model_name}: clean vs {attack}")
        headline = HEADLINE if HEADLINE in per_det else "class_mahalanobis"
        layers = per_det.get(f"{headline}/layers") or {"chosen configuration": per_det[headline]}
        best = max(layers, key=lambda k: evaluate(*layers[k]).auroc)
        plot_histograms(
            *layers[best], out / f"hist_{attack}.png", label_in="clean", label_out=attack,
            title=f"{model_name} {headline}, best layer: {best}",
        )
