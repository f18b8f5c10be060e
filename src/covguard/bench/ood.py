"""Out-of-distribution detection on CIFAR-10, following the OpenOOD v1.5 protocol where the data allows.

- In-distribution: the CIFAR-10 test set (JPEG copy). Detectors are fitted on the training set
  only; ``n_holdout`` training images are held out to standardize layer scores.
- Near-OOD: CIFAR-100 (10,000 real images) and Tiny ImageNet validation (without OpenOOD's
  removal of CIFAR-overlapping images: that list is not available here).
- Far-OOD: MNIST, as is (lossless) and JPEG-matched (PIL quality 75, 4:2:0, like the CIFAR copy).
  Missing from OpenOOD's far set here: SVHN, Textures, Places365.
- Synthetic (reported apart, never in the means): uniform and Gaussian noise, blank frames (solid
  colours and near-constant images, :func:`covguard.data.synthetic.blank_frames`).
- Hyperparameters are fixed in :class:`OODConfig` before any OOD data is seen (the default
  ``protocol="fixed"``); ``protocol="validation"`` (or ``"both"``) adds OpenOOD v1.5's
  validation protocol, each method's configuration chosen on ID-val vs OOD-val
  (:mod:`covguard.bench.validation`). The variant sweep (covariance form, shrinkage, rank,
  aggregation, class scoring, relative distances, layer fusion) derives every form from the same
  fitted moments; normalized features (``OWN_FIT_VARIANTS``) are fitted alongside, in the same
  passes. Its ID-only selection rule: per detector (Simple, Class top-1), the covariance form with the highest mean Gaussian
  log-likelihood of held-out in-distribution patches (per dimension, averaged over layers),
  with mean aggregation (the i.i.d.-patch likelihood) and top-1 class scoring fixed in advance.
- Metrics as OpenOOD v1.5: AUROC and FPR@95%TPR (both conventions), AUPR-In/Out, per set,
  near and far means, mean ± std over the three checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from covguard.bench.common import (
    FORMS, OWN_FIT_VARIANTS, VARIANTS, accuracy, fit_on_train, format_mean_std, mean_std, split_train,
    weights_description,
)
from covguard.bench.own_data import CifarCheckpoints
from covguard.bench.validation import (
    check_protocol, choose_and_score, grid_clones, protocols_of, report_config, selection_markdown, table_suffix,
    validation_split,
)
from covguard.data.images import jpeg_matched
from covguard.data.registry import load_set
from covguard.data.synthetic import blank_frames, gaussian_noise, uniform_noise
from covguard.detectors.likelihood import log_likelihood
from covguard.detectors.multi import score_detectors
from covguard.metrics import evaluate, fpr_at_95tpr_ood_positive
from covguard.html_report import add_html_report
from covguard.report import markdown_table, plot_histograms, plot_roc, write_json

__all__ = ["OODConfig", "eval_sets", "run_ood", "render_markdown", "NEAR", "FAR", "SYNTHETIC"]

logger = logging.getLogger(__name__)

NEAR = ("cifar100", "tin")
FAR = ("mnist", "mnist_jpeg")
SYNTHETIC = ("uniform_noise", "gaussian_noise", "blank")
#: The report's groups of OOD sets on the default data, each with its mean column.
DEFAULT_GROUPS = {"near": NEAR, "far": FAR}
#: Detector shown first in tables: fixed before any OOD data was scored.
HEADLINE = "class_mahalanobis_top1"


@dataclass(frozen=True)
class OODConfig:
    """Settings of the OOD benchmark; defaults are the documented full run."""

    models: tuple[str, ...] = ("resnet20", "resnet32", "resnet44")
    n_holdout: int = 5000  # training images held out from fit to standardize layer scores
    max_train: int | None = None  # cap on fit images (reduced runs); None = all the rest
    max_eval: int | None = None  # cap on images per evaluation set (reduced runs)
    n_noise: int = 2000  # images per synthetic set (uniform and Gaussian noise, blank frames)
    covariance: str = "full"
    mixture: bool = False  # also score class_mahalanobis_mixture (3x the top-1 scoring cost)
    variants: bool = False  # the variant sweep (VARIANTS) with its ID-only selection rule
    n_criterion: int = 2000  # held-out images behind the log-likelihood selection criterion
    baselines: tuple[str, ...] = ("msp", "max_logit", "energy", "odin", "gen", "mds", "rmds", "knn", "vim", "react")
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"
    checkpoints: str = "original"  # "original" shared weights, or "finetuned" on the JPEG training set
    progress: bool = True
    protocol: str = "fixed"  # "fixed" in advance, "validation" (OpenOOD v1.5: chosen on ID-val vs OOD-val), "both"
    n_id_val: int = 1000  # validation: CIFAR-10 test images held out as ID-val (seeded)
    n_ood_val_classes: int = 20  # validation: Tiny ImageNet classes held out as OOD-val (seeded)


def eval_sets(root: Path, cfg: OODConfig) -> dict:
    """ID test set and OOD sets as uint8 images (N, 3, 32, 32), seeded subsets of ``max_eval`` each,
    and the validation split (None under the fixed protocol alone), removed from the test sets."""

    def seeded_pick(images):  # a seeded subset, since loaders return class-sorted order
        if cfg.max_eval is None or len(images) <= cfg.max_eval:
            return images
        return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_eval]]

    test = load_set("cifar10_test", root, progress=cfg.progress)
    tin = load_set("tin", root, progress=cfg.progress)
    split = None
    if "validation" in check_protocol(cfg.protocol):
        split = validation_split(test, tin, n_id_val=cfg.n_id_val, n_ood_val_classes=cfg.n_ood_val_classes, seed=cfg.seed)
    pool = torch.arange(len(test)) if split is None else split.id_test_index  # fixed: pool[perm] is perm itself
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))]
    pick = pick if cfg.max_eval is None else pick[: cfg.max_eval]
    mnist = seeded_pick(load_set("mnist", root, progress=cfg.progress).images)
    n_noise = cfg.n_noise if cfg.max_eval is None else min(cfg.n_noise, cfg.max_eval)
    ood = {
        "cifar100": seeded_pick(load_set("cifar100", root, progress=cfg.progress).images),
        "tin": seeded_pick(tin.images if split is None else tin.images[split.ood_test_index]),
        "mnist": mnist,
        "mnist_jpeg": jpeg_matched(mnist),
        "uniform_noise": (uniform_noise(n_noise, size=32, channels=3, seed=cfg.seed) * 255).round().to(torch.uint8),
        "gaussian_noise": (gaussian_noise(n_noise, size=32, channels=3, seed=cfg.seed) * 255).round().to(torch.uint8),
        "blank": (blank_frames(n_noise, size=32, channels=3, seed=cfg.seed) * 255).round().to(torch.uint8),
    }
    return {"id": (test.images[pick], test.labels[pick]), "ood": ood, "split": split}


def _run_model(name: str, cfg: OODConfig, models, train, sets: dict) -> dict:
    seconds = {}
    tic = time.perf_counter()
    model, taps = models.load(name, cfg.device, len(train.classes) or None)
    x_id, y_id = sets["id"][0].float() / 255, sets["id"][1]
    id_accuracy = accuracy(model, x_id, y_id)
    split, protocols = sets["split"], check_protocol(cfg.protocol)
    clones = grid_clones(taps.baselines_of(model, cfg.baselines)) if split is not None else {}
    detectors, sizes = fit_on_train(
        model, train, baselines=cfg.baselines, covariance=cfg.covariance, n_holdout=cfg.n_holdout,
        max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size, mixture=cfg.mixture,
        keep_moments=cfg.variants or split is not None, also_fit=list(clones.values()),
        own_fit=OWN_FIT_VARIANTS if cfg.variants or split is not None else {}, progress=cfg.progress, taps=taps,
    )
    own = {name: detectors.pop(name) for name in OWN_FIT_VARIANTS if name in detectors}  # the sweep and the grid's
    seconds["fit"] = time.perf_counter() - tic
    result, raw = {"id_accuracy": id_accuracy, **sizes}, {}
    if "fixed" in protocols:
        tic = time.perf_counter()
        scorer = lambda x: score_detectors(detectors, x, batch_size=cfg.batch_size, progress=cfg.progress)  # noqa: E731
        id_scores = scorer(x_id)
        metrics, layer_auroc, raw = _evaluate_sets(scorer, id_scores, sets["ood"])
        seconds["score"] = time.perf_counter() - tic
        result.update(metrics=metrics, layer_auroc=layer_auroc)
    result["seconds"] = seconds
    if cfg.variants:
        tic = time.perf_counter()
        result["variants"] = _variant_sweep(detectors, own, train, sets, x_id, id_scores, metrics, cfg)
        seconds["variants"] = time.perf_counter() - tic
    if split is not None:
        tic = time.perf_counter()
        _, hold = split_train(train, n_holdout=cfg.n_holdout, max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size)
        selection, scorer = choose_and_score({**detectors, **own}, clones, split, hold, batch_size=cfg.batch_size,
                                             progress=cfg.progress)
        metrics, _, raw_chosen = _evaluate_sets(scorer, scorer(x_id), sets["ood"])
        result["validation"] = {"selection": selection, "metrics": metrics}
        raw = raw or raw_chosen
        seconds["validation"] = time.perf_counter() - tic
    return {"result": result, "raw": raw}


def _evaluate_sets(scorer: Callable, id_scores: dict, ood_sets: dict) -> tuple[dict, dict, dict]:
    """Metrics, per-layer AUROC and raw score pairs per OOD set and detector, from ``scorer(images)``."""
    metrics, layer_auroc, raw = {}, {}, {}
    for set_name, images in ood_sets.items():
        ood_scores = scorer(images.float() / 255)
        metrics[set_name], layer_auroc[set_name], raw[set_name] = {}, {}, {}
        for det_name in id_scores:
            (s_in, l_in), (s_out, l_out) = id_scores[det_name], ood_scores[det_name]
            m = evaluate(s_in, s_out).to_dict()
            m["fpr_at_95tpr_ood_positive"] = fpr_at_95tpr_ood_positive(s_in, s_out)
            metrics[set_name][det_name] = m
            raw[set_name][det_name] = (s_in, s_out)
            if l_in:
                layer_auroc[set_name][det_name] = {k: evaluate(l_in[k], l_out[k]).auroc for k in l_in}
    return metrics, layer_auroc, raw


def _variant_sweep(detectors: dict, own: dict, train, sets: dict, x_id: Tensor, id_scores: dict, metrics: dict,
                   cfg: OODConfig) -> dict:
    """Per variant: held-out log-likelihood (the ID-only criterion; None for relative distances,
    which have no density) and AUROC per OOD set. ``own``: the fitted :data:`OWN_FIT_VARIANTS`."""
    _, hold = split_train(train, n_holdout=cfg.n_holdout, max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size)
    criterion_images = hold.images[: cfg.n_criterion].float() / 255
    built, same_as = {}, {}
    for name, (base, changes) in VARIANTS.items():
        if not changes:
            same_as[name] = base
        else:
            built[name] = detectors[base].refit(holdout=hold, progress=cfg.progress, **changes)
    built.update(own)
    every = {**{n: detectors[b] for n, b in same_as.items()}, **built}
    out = {}
    for name, det in every.items():
        ll = None
        if not det.relative_distances:
            ll = torch.cat([log_likelihood(det, criterion_images[i : i + cfg.batch_size])
                            for i in range(0, len(criterion_images), cfg.batch_size)]).mean().item()  # of (n, n_layers)
        out[name] = {"holdout_log_likelihood": ll, "auroc": {}}
    if built:
        own_id = score_detectors(built, x_id, batch_size=cfg.batch_size)
        for set_name, images in sets["ood"].items():
            own_ood = score_detectors(built, images.float() / 255, batch_size=cfg.batch_size)
            for name in built:
                out[name]["auroc"][set_name] = evaluate(own_id[name][0], own_ood[name][0]).auroc
    for name, base in same_as.items():
        out[name]["auroc"] = {s: metrics[s][base]["auroc"] for s in sets["ood"]}
    for kind in ("simple", "class-top1"):
        candidates = [f"{kind}/{form}/mean" for form in FORMS]
        chosen = max(candidates, key=lambda n: out[n]["holdout_log_likelihood"])
        out[chosen]["selected"] = True
    return out


def run_ood(
    root: str | Path | None, out: str | Path, config: OODConfig = OODConfig(), *, models=None, data=None
) -> dict:
    """Run the OOD benchmark on every configured checkpoint and write the report folder.

    Parameters
    ----------
    root : str or Path, optional
        Data root with ``cifar10-jpeg/``, ``cifar100-jpeg.tar``, ``tiny-imagenet-200-val.tar``,
        ``mnist/`` and ``models/``; not read when ``models`` and ``data`` are both given.
    out : str or Path
        Report folder: ``results.json``, ``results.md``, ``roc_<set>.png``, ``hist_<set>.png``.
    config : OODConfig
        ``config.models`` names the checkpoints ``models`` loads.
    models : model source, optional
        ``load(name, device, n_classes) -> (model, taps)``, e.g. :class:`~covguard.bench.own_data.OwnCheckpoints`;
        default: the CIFAR ResNets of ``root``.
    data : OwnSets, optional
        Own ID and OOD sets (:mod:`covguard.bench.own_data`), reported as one ``ood`` group; default:
        the CIFAR-10 / CIFAR-100 / TIN / MNIST sets of ``root``. Fixed protocol only.

    Returns
    -------
    dict
        What ``results.json`` holds.
    """
    out = Path(out)
    protocols = check_protocol(config.protocol)
    if config.variants and "fixed" not in protocols:
        raise ValueError("variants reports the fixed protocol's sweep: use protocol 'fixed' or 'both' with it")
    if data is not None and protocols != ("fixed",):
        raise ValueError("--protocol validation holds out Tiny ImageNet classes as OOD-val: it runs on the default sets only, "
                         "not with --id-train / --ood")
    models = models or CifarCheckpoints(Path(root), config.checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        train, sets, id_name = load_set("cifar10_train", root, progress=config.progress), eval_sets(Path(root), config), "cifar10_test"
    else:
        train, id_name = data.train(config.progress), "id_test"
        sets = data.eval_sets(train.classes, max_eval=config.max_eval, n_noise=config.n_noise, seed=config.seed,
                              progress=config.progress)
    results = {
        "config": report_config(config),
        "n_images": {id_name: len(sets["id"][0]), **{k: len(v) for k, v in sets["ood"].items()}},
        **({"validation_split": sets["split"].describe()} if sets["split"] is not None else {}),
        **({"groups": data.groups, **data.describe()} if data is not None else {}),
        **models.describe(),
        "models": {},
    }
    id_label = "CIFAR-10 test" if data is None else "ID test"
    headline = HEADLINE if "fixed" in protocols else "class_mahalanobis"  # the validation protocol's class method
    for name in config.models:
        run = _run_model(name, config, models, train, sets)
        results["models"][name] = run["result"]
        if name == config.models[0]:
            for set_name, curves in run["raw"].items():
                plot_roc(curves, out / f"roc_{set_name}.png", title=f"{name}: {id_label} vs {set_name}")
                plot_histograms(*curves[headline], out / f"hist_{set_name}.png", label_in=id_label,
                                label_out=set_name, title=f"{name} {headline}")
        # Written after every checkpoint, so a long run leaves a usable report at any point.
        write_json(results, out / "results.json")
        (out / "results.md").write_text(render_markdown(results))
        add_html_report(out)
    return results


def _group_mean(metrics: dict, det: str, sets: Sequence[str], key: str) -> float:
    return sum(metrics[s][det][key] for s in sets) / len(sets)


def render_markdown(results: dict) -> str:
    """Tables: AUROC per set with near/far means, FPR@95, per-layer AUROC; mean ± std over checkpoints, %.

    Per protocol run (fixed, validation); a fixed-only report keeps its headings unchanged.
    """
    models = results["models"]
    first = next(iter(models.values()))
    protocols = protocols_of(results["config"])
    groups = results.get("groups") or DEFAULT_GROUPS
    own = results.get("own_sets")
    lines = [
        "# OOD detection on CIFAR-10 (JPEG copy), OpenOOD v1.5 protocol on the sets available here" if own is None else
        f"# OOD detection on own data: ID {own['id_test']} (fitted on {own['id_train']}), images resized to {own['image_size']}",
        "",
        ("Near: CIFAR-100, Tiny ImageNet (val). Far: MNIST as is and JPEG-matched. " if own is None else
         f"OOD sets (one group, 'ood'): {', '.join(f'{k} ({v})' for k, v in own['ood'].items())}. ") +
        "Noise sets and blank frames are reported apart and are not in the means. Values: mean ± std over checkpoints, in %. "
        f"Images per set: {', '.join(f'{k} {v}' for k, v in results['n_images'].items())}. "
        f"Weights: {results.get('weights') or weights_description(results['config'])}.",
        "",
        markdown_table(
            [{"model": k, "ID accuracy": f"{m['id_accuracy'] * 100:.2f}", "fit images": m["n_fit"]} for k, m in models.items()],
            ["model", "ID accuracy", "fit images"],
        ),
        "",
    ]
    if "fixed" in protocols:
        detectors = list(next(iter(first["metrics"].values())))
        detectors = [HEADLINE, *[d for d in detectors if d != HEADLINE]]
        suffix = table_suffix(protocols, "fixed")
        lines += _metric_tables(models, detectors, lambda m: m["metrics"], suffix, groups)
        sets = [*_sets(groups), *SYNTHETIC]
        rows = []
        for det, per_layer in first["layer_auroc"][sets[0]].items():
            for layer in per_layer:
                row = {"detector": det, "layer": layer}
                for s in sets:
                    values = [m["layer_auroc"][s][det][layer] for m in models.values() if s in m["layer_auroc"]]
                    row[s] = format_mean_std(values) if values else None
                rows.append(row)
        lines += [f"## Per-layer AUROC of the patch detectors{suffix}", "", markdown_table(rows, ["detector", "layer", *sets]), ""]
        lines += _best_line(models, detectors, lambda m: m["metrics"], groups)
    if "validation" in protocols:
        lines += selection_markdown(results)
        detectors = list(first["validation"]["selection"])
        lines += _metric_tables(models, detectors, lambda m: m["validation"]["metrics"], table_suffix(protocols, "validation"), groups)
        lines += _best_line(models, detectors, lambda m: m["validation"]["metrics"], groups)
    return "\n".join(lines + _variants_markdown(models, groups))


def _sets(groups: dict) -> list[str]:
    return [s for sets in groups.values() for s in sets]


def _columns(groups: dict) -> list[str]:
    """Each group's sets followed by the group's mean: cifar100, tin, near, mnist, mnist_jpeg, far."""
    return [c for name, sets in groups.items() for c in (*sets, name)]


def _metric_tables(models: dict, detectors: Sequence[str], get: Callable[[dict], dict], suffix: str, groups: dict) -> list[str]:
    """AUROC and both FPR@95 tables: per set, and per group (near, far) means (``get(model result)`` -> metrics)."""
    sets = [*_sets(groups), *SYNTHETIC]
    lines = []
    for title, key in (
        ("AUROC (higher is better)", "auroc"),
        ("FPR at 95% TPR, in-distribution positive (lower is better)", "fpr_at_95tpr"),
        ("FPR at 95% TPR, OOD positive as OpenOOD v1.5 (lower is better)", "fpr_at_95tpr_ood_positive"),
    ):
        rows = []
        for det in detectors:
            row = {"method": det}
            for s in sets:  # a report written before a synthetic set existed leaves its cell empty
                values = [get(m)[s][det][key] for m in models.values() if s in get(m)]
                row[s] = format_mean_std(values) if values else None
            for group, members in groups.items():
                row[group] = format_mean_std([_group_mean(get(m), det, members, key) for m in models.values()])
            rows.append(row)
        lines += [f"## {title}{suffix}", "", markdown_table(rows, ["method", *_columns(groups), *SYNTHETIC]), ""]
    return lines


def _best_line(models: dict, detectors: Sequence[str], get: Callable[[dict], dict], groups: dict) -> list[str]:
    parts = []
    for group, members in groups.items():
        mean = {d: mean_std([_group_mean(get(m), d, members, "auroc") for m in models.values()])[0] for d in detectors}
        best = max(mean, key=mean.get)
        parts.append(f"{group}-OOD mean AUROC: {best} ({mean[best] * 100:.1f})")
    return ["Best " + "; best ".join(parts) + ".", ""]


def _variants_markdown(models: dict, groups: dict = DEFAULT_GROUPS) -> list[str]:
    """The variant sweep: held-out log-likelihood (ID criterion), AUROC per set, near/far means."""
    swept = [m["variants"] for m in models.values() if m.get("variants")]
    if not swept:
        return []
    sets = [*_sets(groups), *SYNTHETIC]
    rows = []
    for name in swept[0]:
        per = [v[name] for v in swept]
        chosen = sum(bool(p.get("selected")) for p in per)
        row = {
            "variant": name,
            "ID rule": f"selected {chosen}/{len(per)}" if chosen else "",
            "held-out log-lik / dim": "" if per[0]["holdout_log_likelihood"] is None else
            format_mean_std([p["holdout_log_likelihood"] for p in per], scale=1.0, digits=3),
        }
        for s in sets:
            values = [p["auroc"][s] for p in per if s in p["auroc"]]
            row[s] = format_mean_std(values) if values else None
        for group, members in groups.items():
            row[group] = format_mean_std([sum(p["auroc"][s] for s in members) / len(members) for p in per])
        rows.append(row)
    return [
        "## Variant sweep (AUROC %, mean ± std over checkpoints)",
        "",
        "Every variant comes from the same fitted moments (name: detector/covariance form/aggregation[/option]), "
        "but for the normalized features, fitted anew on the same images; relative distances have no likelihood. "
        "ID rule, fixed before scoring any OOD data: per detector, the form with the highest mean Gaussian "
        "log-likelihood of held-out CIFAR-10 training patches (per dimension, averaged over layers), with mean "
        "aggregation and top-1 class scoring; 'selected k/n' counts the checkpoints where it was chosen. "
        "The OOD columns are shown for information and choose nothing.",
        "",
        markdown_table(rows, ["variant", "ID rule", "held-out log-lik / dim", *_columns(groups), *SYNTHETIC]),
        "",
    ]
