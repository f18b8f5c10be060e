"""``covguard bench frontier``: detection quality next to scoring cost, per covariance form.

For Simple and Class top-1 and each covariance form (:data:`FORMS`: full, full with OAS
shrinkage, diagonal, low rank 8/16/32/64, and Class accumulated in a shared basis), one run
measures, on the CIFAR-10 checkpoints (fine-tuned by default):

- **Quality**: AUROC of the validation pair of OpenOOD v1.5 (ID-val vs OOD-val, the held-out
  Tiny ImageNet classes; :mod:`covguard.bench.validation`), near OOD (CIFAR-100, Tiny ImageNet
  test classes), far OOD (MNIST, MNIST JPEG-matched) and the L-inf attacks at 8/255, each form
  with exact statistics and with a seeded share of patch positions per fit image
  (``fit_positions``). Every form of a detector comes from one fit (``refit`` of the kept
  moments), so they differ in the form alone.
- **Cost**: scoring overhead ``t(forward + detector) / t(forward) - 1`` at batch 256 and 1
  (medians of interleaved repeats), on the fine-tuned ResNet-20 and on a randomly initialized
  ResNet-18 (four stages), each with every form fitted on the timed images (the cost of scoring
  depends on the shapes of the statistics, not their values), and the fit throughput of the
  chosen default.
- **The default** (:func:`choose_default`), from validation data and measured cost only: among
  the forms whose overhead at the largest timed batch (256) is at most ``overhead_budget`` on the
  ``budget_models`` (ResNet-18's four stages), the one of highest validation AUROC. Its form is then fitted again with smaller shares of
  positions (``sweep_positions``), and the smallest share whose validation AUROC is within
  ``positions_tolerance`` of exact statistics is kept. The test categories only report how far
  the choice lands from full covariance.

The report (``results.json``, ``results.md``, ``frontier.png``) is rewritten after each stage,
so a stopped run keeps what it finished (:mod:`covguard.bench.frontier_report`); ``resume``
reuses the quality measurements of a finished report of the same quality settings.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from covguard.attacks import success_mask
from covguard.bench.cache import TensorCache, tensor_sha256
from covguard.bench.common import CIFAR_LAYERS, CIFAR_MODELS, fit_on_train, load_cifar_model, predict, split_train
from covguard.bench.frontier_report import read_report, write_report
from covguard.bench.ood import OODConfig, eval_sets
from covguard.bench.suite_config import SuiteConfig
from covguard.bench.suite_sets import attack_settings, build_attack, craft
from covguard.bench.timing_speed import interleaved, make_model, time_fit, timer
from covguard.data.registry import load_set
from covguard.detectors import ClassMahalanobis, Detector, SimpleMahalanobis
from covguard.detectors.multi import fit_detectors, score_detectors
from covguard.features import parameter_sha256
from covguard.metrics import evaluate

__all__ = ["BASIS", "FORMS", "KINDS", "QUALITY_FIELDS", "FrontierConfig", "choose_default", "run_frontier", "sweep_name"]

logger = logging.getLogger(__name__)

#: Detector kind -> its name in the fitted line-up (:func:`~covguard.bench.common.patch_detectors`).
KINDS = {"simple": "simple_mahalanobis", "class-top1": "class_mahalanobis_top1"}
#: Covariance forms derived from the kept moments: name -> ``refit`` changes.
FORMS: dict[str, dict] = {
    "full": {},
    "full-oas": {"shrinkage": "oas"},
    "diag": {"covariance": "diag"},
    **{f"lowrank-{k}": {"covariance": "lowrank", "rank": k} for k in (8, 16, 32, 64)},
}
#: Class statistics accumulated in a shared basis (a fit of its own): name -> constructor changes.
BASIS = {"basis-64/lowrank-16": {"basis_rank": 64, "covariance": "lowrank", "rank": 16}}
NEAR, FAR = ("cifar100", "tin"), ("mnist", "mnist_jpeg")
CATEGORIES = ("val", "near", "far", "adversarial")
TIMING_LAYERS = {"resnet18_32x32": ("layer1", "layer2", "layer3", "layer4")}
#: Settings a stored quality measurement must share to be reused (``resume``).
QUALITY_FIELDS = ("checkpoints", "n_images", "n_id_val", "n_ood_val_classes", "n_holdout", "max_train", "fit_positions",
                  "attacks", "eps", "steps", "igm_scales", "seed", "batch_size")
#: Settings a stored overhead measurement must share to be reused (``resume``), with the quality ones.
TIMING_FIELDS = ("batch_sizes", "repeats", "max_calls", "device")


@dataclass(frozen=True)
class FrontierConfig:
    """Settings of ``covguard bench frontier``; the defaults are the documented run."""

    models: tuple[str, ...] = ("resnet20",)  # CIFAR-10 checkpoints whose quality is measured
    checkpoints: str = "finetuned"
    timing_models: tuple[str, ...] = ("resnet20", "resnet18_32x32")  # resnet20: the fitted checkpoint; others random init
    budget_models: tuple[str, ...] = ("resnet18_32x32",)  # timed models whose batch-256 overhead bounds the default
    n_images: int = 1000  # test images per set (seeded subsets); attacked: the correctly classified ones among the ID draw
    n_id_val: int = 1000
    n_ood_val_classes: int = 20
    n_holdout: int = 5000
    max_train: int | None = None
    fit_positions: float = 0.25  # share of patch positions per image of the subsampled fits (every form)
    sweep_positions: tuple[float, ...] = (0.1, 0.05)  # smaller shares fitted for the default form only
    attacks: tuple[str, ...] = ("fgsm", "bim", "pgd", "igm")
    eps: float = 8 / 255
    steps: int = 10
    igm_scales: int = 8
    batch_sizes: tuple[int, ...] = (256, 1)
    repeats: int = 5
    max_calls: int = 8  # scoring calls per timed measurement at small batches (64 // batch, at most this)
    fit_batches: tuple[int, int] = (1, 4)  # loader sizes (batches of batch_size) whose fit-time difference is timed
    overhead_budget: float = 0.10
    positions_tolerance: float = 0.005
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"
    cache: bool = True
    cache_dir: str | None = None
    progress: bool = True

    def check(self) -> None:
        """Refuse settings the run cannot use, naming the field."""
        if unknown := [m for m in self.models if m not in CIFAR_MODELS]:
            raise ValueError(f"models must be among {CIFAR_MODELS}; got {unknown}")
        if unknown := [m for m in self.timing_models if m != "resnet20" and m not in TIMING_LAYERS]:
            raise ValueError(f"timing_models must be among {('resnet20', *TIMING_LAYERS)}; got {unknown}")
        if not self.budget_models or not set(self.budget_models) <= set(self.timing_models):
            raise ValueError(f"budget_models must be some of timing_models {self.timing_models}; got {self.budget_models}")
        if not 0 < self.fit_positions < 1:
            raise ValueError(f"fit_positions must be in (0, 1) (1 is the exact fit, always run); got {self.fit_positions}")
        if not all(0 < p < 1 for p in self.sweep_positions):
            raise ValueError(f"sweep_positions must be shares in (0, 1); got {self.sweep_positions}")
        if not self.fit_batches[0] < self.fit_batches[1]:
            raise ValueError(f"fit_batches must be two increasing loader sizes; got {self.fit_batches}")
        for name in ("n_images", "repeats", "max_calls", "batch_size", "steps", "igm_scales"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


def variant_names() -> list[str]:
    """Every scored variant, ``<kind>/<form>`` and ``<kind>/<form>@positions``, in table order."""
    names = [f"{kind}/{form}{suffix}" for kind in KINDS for form in FORMS for suffix in ("", "@positions")]
    return names + [f"class-top1/{form}" for form in BASIS]


def _variants(model: nn.Module, train, cfg: FrontierConfig) -> dict[str, Detector]:
    """Fit Simple and Class top-1 (exact and subsampled statistics, kept moments) and the basis
    fits in one joint pass; derive every form of :data:`FORMS` from the kept moments."""
    common = {"layers": CIFAR_LAYERS, "kernel_size": _kernels(CIFAR_LAYERS)}
    exact = {"covariance": "full", "fit_positions": 1.0}
    sub = {"keep_moments": True, "fit_positions": cfg.fit_positions, "random_state": cfg.seed}
    extra = {
        "simple@positions": SimpleMahalanobis(model, **common, **sub, covariance="full"),
        "class-top1@positions": ClassMahalanobis(model, scoring="top1", **common, **sub, covariance="full"),
        **{f"class-top1/{form}": ClassMahalanobis(model, scoring="top1", **{**common, **exact, **changes}) for form, changes in BASIS.items()},
    }
    fitted, _ = fit_on_train(
        model, train, baselines=(), n_holdout=cfg.n_holdout, max_train=cfg.max_train, seed=cfg.seed,
        batch_size=cfg.batch_size, mixture=False, keep_moments=True, also_fit=list(extra.values()), progress=cfg.progress,
    )
    _, hold = split_train(train, n_holdout=cfg.n_holdout, max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size)
    out: dict[str, Detector] = {}
    for kind, name in KINDS.items():
        for suffix, base in (("", fitted[name]), ("@positions", extra[f"{kind}@positions"])):
            for form, changes in FORMS.items():
                out[f"{kind}/{form}{suffix}"] = base.refit(holdout=hold, progress=False, **changes) if changes else base
    out.update({name: det for name, det in extra.items() if "/" in name})
    return {name: out[name] for name in variant_names()}


def _images(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _auroc(neg: Tensor, pos: Tensor) -> float:
    return evaluate(neg, pos).auroc


def _attacks(model: nn.Module, name: str, x: Tensor, y: Tensor, cfg: FrontierConfig, cache: TensorCache) -> dict[str, dict[str, Tensor]]:
    """Adversarials of ``x`` (correctly classified) per attack, with the success mask; cached."""
    suite_cfg = SuiteConfig(steps=cfg.steps, igm_scales=cfg.igm_scales, seed=cfg.seed, batch_size=cfg.batch_size,
                            device=cfg.device, progress=cfg.progress)
    key = {"model": name, "weights": parameter_sha256(model), "clean": tensor_sha256(x), "labels": tensor_sha256(y)}
    out = {}
    for attack in cfg.attacks:
        def compute(attack=attack) -> dict[str, Tensor]:
            adv = craft(build_attack(attack, model, cfg.eps, suite_cfg, torch.Generator().manual_seed(cfg.seed)), x, y, suite_cfg,
                        f"{name} {attack}")
            return {"x_adv": adv, "success": success_mask(model, adv.to(cfg.device), y.to(cfg.device)).cpu()}

        out[attack] = cache.get("attacks", {**key, **attack_settings(attack, cfg.eps, suite_cfg)}, compute)
    return out


def quality(name: str, model: nn.Module, detectors: Mapping[str, Detector], sets: dict, cfg: FrontierConfig, cache: TensorCache) -> dict:
    """AUROC per variant and set, and the category means (:data:`CATEGORIES`)."""
    def scores(x: Tensor) -> dict[str, Tensor]:
        return {det: s for det, (s, _) in score_detectors(dict(detectors), _images(x), batch_size=cfg.batch_size,
                                                          progress=cfg.progress).items()}

    split = sets["split"]
    x_id, y_id = sets["id"]
    per_set: dict[str, dict[str, float]] = {det: {} for det in detectors}
    id_val, ood_val = scores(split.id_val), scores(split.ood_val)
    id_scores = scores(x_id)
    for det in detectors:
        per_set[det]["val"] = _auroc(id_val[det], ood_val[det])
    for set_name in (*NEAR, *FAR):
        got = scores(sets["ood"][set_name])
        for det in detectors:
            per_set[det][set_name] = _auroc(id_scores[det], got[det])
    correct = predict(model, _images(x_id), batch_size=cfg.batch_size) == y_id
    success = {}
    attacked = _attacks(model, name, _images(x_id[correct]), y_id[correct], cfg, cache) if correct.any() else {}
    for attack, adv in attacked.items():
        ok = adv["success"].bool()
        success[attack] = ok.float().mean().item()
        if ok.sum() < 2:
            logger.warning("%s: %s succeeded on %d images; not scored", name, attack, int(ok.sum()))
            continue
        got = scores(adv["x_adv"][ok])
        for det in detectors:
            per_set[det][attack] = _auroc(id_scores[det][correct][ok], got[det])
    categories = {
        det: {"val": v["val"], "near": statistics.fmean(v[s] for s in NEAR), "far": statistics.fmean(v[s] for s in FAR),
              "adversarial": statistics.fmean(v[a] for a in cfg.attacks if a in v) if set(cfg.attacks) & set(v) else float("nan")}
        for det, v in per_set.items()
    }
    return {"id_accuracy": correct.float().mean().item(), "n_attacked": int(correct.sum()), "attack_success_rate": success,
            "per_set": per_set, "categories": categories}


def overheads(model: nn.Module, detectors: Mapping[str, Detector], x: Tensor, cfg: FrontierConfig) -> dict[str, dict[str, float]]:
    """Scoring overhead of each detector at each batch size: {variant: {str(batch): overhead}}."""
    device = torch.device(cfg.device)
    out: dict[str, dict[str, float]] = {name: {} for name in detectors}
    for batch in cfg.batch_sizes:
        xb = x[:batch].to(device)
        number = max(1, min(cfg.max_calls, 64 // batch))  # calls per measurement for tiny batches
        forward = timer(lambda: model(xb), device, number)
        for name, det in detectors.items():
            with torch.no_grad():
                times, paired = interleaved({name: timer(lambda d=det: d.score(xb), device, number)}, forward, cfg.repeats,
                                            warmup=1 if batch >= 64 else 3)
            out[name][str(batch)] = statistics.median(t / f for t, f in zip(times[name], paired[name])) - 1
            logger.info("%s batch %d overhead %.3f", name, batch, out[name][str(batch)])
    return out


def _timing_variants(name: str, root: Path, sets: dict, cfg: FrontierConfig) -> tuple[nn.Module, dict[str, Detector], Tensor]:
    """A timing model (the checkpoint of a CIFAR model, else random init), every form (exact
    statistics) fitted on the timed images, and those images (ID test images for a checkpoint)."""
    device = torch.device(cfg.device)
    n = max(*cfg.batch_sizes, 64)  # timed images, also the fit images (the statistics do not change the cost)
    gen = torch.Generator().manual_seed(cfg.seed)
    if name in CIFAR_MODELS:
        model = load_cifar_model(root, name, cfg.device, checkpoints=cfg.checkpoints)
        layers, kernel = CIFAR_LAYERS, _kernels(CIFAR_LAYERS)
        x, y = _images(sets["id"][0][:n]).to(device), sets["id"][1][:n].to(device)
    else:
        model = make_model(name, device, channels_last=False)
        layers, kernel = TIMING_LAYERS[name], 3
        x, y = torch.rand(n, 3, 32, 32, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device)
    common = {"layers": layers, "kernel_size": kernel, "covariance": "full", "fit_positions": 1.0}
    base = {kind: (SimpleMahalanobis if kind == "simple" else ClassMahalanobis)(model, keep_moments=True, **common) for kind in KINDS}
    basis = {f"class-top1/{form}": ClassMahalanobis(model, **{**common, **changes}) for form, changes in BASIS.items()}
    fit_detectors([*base.values(), *basis.values()], [(x, y)], holdout=[x[:32]], progress=False)
    out = {f"{kind}/{form}": det.refit(holdout=[x[:32]], **changes) if changes else det
           for kind, det in base.items() for form, changes in FORMS.items()}
    return model, {**out, **basis}, x


def _kernels(layers) -> dict[str, int]:
    return {layer: 1 if layer == "avgpool" else 3 for layer in layers}


def _categories(results: dict, variant: str, cat: str) -> float:
    """Mean over the quality models of one category of a variant (of the form table or the sweep)."""
    return statistics.fmean({**m["quality"]["categories"], **m.get("sweep", {}).get("categories", {})}[variant][cat]
                            for m in results["models"].values())


def sweep_name(kind: str, form: str, share: float) -> str:
    """Name of a ``sweep_positions`` variant of the default form."""
    return f"{kind}/{form}@{share:g}"


def choose_default(results: dict, cfg: FrontierConfig) -> dict:
    """Per kind, the form chosen from validation AUROC and measured cost only (module docstring),
    with the smallest share of positions measured (``fit_positions``, then the sweep, once run)
    within ``positions_tolerance`` of exact statistics on validation data.

    Returns {kind: {"form", "fit_positions", "variant", "val_auroc", "overhead_256", "within_budget", "delta_vs_full"}}.
    """
    out = {}
    for kind in KINDS:
        forms = [v.split("/", 1)[1] for v in variant_names() if v.startswith(kind + "/") and "@" not in v]

        def worst_overhead(form: str) -> float:
            return max(results["timing"][m][f"{kind}/{form}"][str(max(cfg.batch_sizes))] for m in cfg.budget_models)

        within = [f for f in forms if worst_overhead(f) <= cfg.overhead_budget]
        form = max(within or forms, key=lambda f: (_categories(results, f"{kind}/{f}", "val"), -worst_overhead(f)))
        exact = f"{kind}/{form}"
        shares = {1.0: exact}
        if f"{exact}@positions" in variant_names():
            shares[cfg.fit_positions] = f"{exact}@positions"
        measured = {name for m in results["models"].values() for name in m.get("sweep", {}).get("categories", {})}
        shares.update({p: sweep_name(kind, form, p) for p in cfg.sweep_positions if sweep_name(kind, form, p) in measured})
        floor = _categories(results, exact, "val") - cfg.positions_tolerance
        share = min(p for p, v in shares.items() if p == 1.0 or _categories(results, v, "val") >= floor)
        chosen = shares[share]
        out[kind] = {
            "form": form, "fit_positions": share, "variant": chosen,
            "val_auroc": _categories(results, chosen, "val"), "overhead_256": worst_overhead(form), "within_budget": bool(within),
            "delta_vs_full": {cat: _categories(results, chosen, cat) - _categories(results, f"{kind}/full", cat) for cat in CATEGORIES},
        }
    return out


def _constructor(kind: str, form: str) -> tuple[type[Detector], dict]:
    cls = SimpleMahalanobis if kind == "simple" else ClassMahalanobis
    return cls, {**({} if kind == "simple" else {"scoring": "top1"}), "covariance": "full", **FORMS.get(form, {}), **BASIS.get(form, {})}


def _sweep(model: nn.Module, train, chosen: dict, cfg: FrontierConfig) -> dict[str, Detector]:
    """The default form of each kind fitted with every share of ``sweep_positions`` (one joint pass)."""
    dets = {}
    for kind, choice in chosen.items():
        cls, changes = _constructor(kind, choice["form"])
        for p in cfg.sweep_positions:
            dets[sweep_name(kind, choice["form"], p)] = cls(model, layers=CIFAR_LAYERS, kernel_size=_kernels(CIFAR_LAYERS),
                                                             fit_positions=p, random_state=cfg.seed, **changes)
    fit, hold = split_train(train, n_holdout=cfg.n_holdout, max_train=cfg.max_train, seed=cfg.seed, batch_size=cfg.batch_size)
    fit_detectors(list(dets.values()), fit, holdout=hold, progress=cfg.progress)
    return dets


def _fit_builders(model: nn.Module, layers, chosen: dict) -> dict[str, Callable[[], Detector]]:
    """Builders of the default of each kind, with exact statistics and with its share of positions."""
    kernel = _kernels(layers)
    out = {}
    for kind, choice in chosen.items():
        cls, changes = _constructor(kind, choice["form"])
        for p in sorted({1.0, choice["fit_positions"]}, reverse=True):
            out[f"{kind}/{choice['form']} positions={p:g}"] = (
                lambda cls=cls, changes=changes, p=p: cls(model, layers=layers, kernel_size=kernel, fit_positions=p, **changes))
    return out


def _stored(out: Path, config: FrontierConfig) -> tuple[dict, dict]:
    """The measurements of the report in ``out`` that ``config`` would repeat: ({model: quality
    and sweep} under the same :data:`QUALITY_FIELDS`, {timed model: overheads} under the same
    quality and :data:`TIMING_FIELDS`); empty where the settings differ."""
    stored = read_report(out)
    same = json.loads(json.dumps(asdict(config)))
    if stored is None or any(stored["config"].get(f) != same[f] for f in QUALITY_FIELDS):
        return {}, {}
    models = {name: m for name, m in stored["models"].items() if "quality" in m}
    timed = all(stored["config"].get(f) == same[f] for f in TIMING_FIELDS)
    return models, stored["timing"] if timed else {}


def run_frontier(root: str | Path, out: str | Path, config: FrontierConfig = FrontierConfig(), *, resume: bool = False) -> dict:
    """Measure quality and cost of every variant, choose the default, write the report; returns
    ``results.json``'s content. ``resume``: reuse the quality, sweep and overhead measurements of
    the report in ``out`` whose settings are those of ``config`` (:func:`_stored`)."""
    config.check()
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = TensorCache(config.cache_dir, enabled=config.cache)
    ood_cfg = OODConfig(max_eval=config.n_images, n_noise=1, seed=config.seed, protocol="validation", n_id_val=config.n_id_val,
                        n_ood_val_classes=config.n_ood_val_classes, progress=config.progress)
    sets = eval_sets(root, ood_cfg)
    train = load_set("cifar10_train", root, progress=config.progress)
    stored, stored_timing = _stored(out, config) if resume else ({}, {})
    results: dict = {"config": asdict(config), "variants": variant_names(), "models": {}, "timing": {}, "fit": {}}
    models = {name: load_cifar_model(root, name, config.device, checkpoints=config.checkpoints) for name in config.models}
    for name, model in models.items():
        if name in stored:
            logger.info("%s: quality reused from %s", name, out / "results.json")
            results["models"][name] = {"quality": stored[name]["quality"]}
        else:
            results["models"][name] = {"quality": quality(name, model, _variants(model, train, config), sets, config, cache)}
        write_report(results, out)
    for name in config.timing_models:
        if name in stored_timing:
            logger.info("%s: overheads reused from %s", name, out / "results.json")
            results["timing"][name] = stored_timing[name]
        else:
            model, dets, x = _timing_variants(name, root, sets, config)
            results["timing"][name] = overheads(model, dets, x, config)
        write_report(results, out)
    results["default"] = choose_default(results, config)
    for name, model in models.items():
        wanted = {sweep_name(kind, d["form"], p) for kind, d in results["default"].items() for p in config.sweep_positions}
        if wanted <= set(stored.get(name, {}).get("sweep", {}).get("categories", {})):
            results["models"][name]["sweep"] = stored[name]["sweep"]
        else:
            results["models"][name]["sweep"] = quality(name, model, _sweep(model, train, results["default"], config), sets, config, cache)
        write_report(results, out)
    results["default"] = choose_default(results, config)
    for name in config.timing_models:
        model = models[name] if name in models else make_model(name, torch.device(config.device), channels_last=False)
        layers = CIFAR_LAYERS if name in models else TIMING_LAYERS[name]
        rows = time_fit(name, model, config.batch_size, config.fit_batches, config.repeats, torch.device(config.device), False,
                        builders=_fit_builders(model, layers, results["default"]))
        results["fit"][name] = [asdict(r) for r in rows]
        write_report(results, out)
    return results
