"""The OpenOOD v1.5 validation protocol: every method picks its hyperparameters on validation data.

``bench ood`` and ``bench adversarial`` report by default the *fixed* protocol: every
hyperparameter is set before any OOD or adversarial image is seen. ``--protocol validation``
follows OpenOOD v1.5 (Zhang et al., "OpenOOD v1.5: Enhanced Benchmark for Out-of-Distribution
Detection", 2023), which tunes each method on an ID-val / OOD-val pair; ``both`` reports the two
side by side, scored on the same test sets.

- ID-val: ``n_id_val`` (1,000) CIFAR-10 test images drawn with the run's seed
  (:func:`id_val_split`), removed from the ID test set of every method alike.
- OOD-val: every image of ``n_ood_val_classes`` (20) Tiny ImageNet classes drawn with the seed
  (:func:`ood_val_split`; TIN val holds 50 images per class, so 1,000), removed from the TIN test
  set. OpenOOD's own validation image lists are not available here, hence the seeded draws;
  holding out whole classes keeps every OOD-val class unseen at test time.
- Each method scores every point of its grid (:data:`GRIDS`) on ID-val and OOD-val and keeps the
  point of highest validation AUROC (:func:`select`; ties go to the first point in grid order).
- One chosen configuration per method is then scored on every OOD test set and every attack:
  no test set and no attack chooses anything.

Grid points cost no extra pass over the training data: logit-only baselines are clones, KNN
shares its bank (:meth:`~covguard.detectors.knn.KNN.with_k`), ReAct and ViM clones are fitted in
the same passes as everything else (:func:`grid_clones`), our variants are ``refit`` from the
kept moments, and a single layer's score is a column of the layer scores already computed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from covguard.bench.common import CIFAR_LAYERS, OWN_FIT_VARIANTS, VARIANTS
from covguard.data.images import ImageSet
from covguard.detectors.base import Detector
from covguard.detectors.knn import KNN
from covguard.detectors.multi import score_detectors
from covguard.detectors.patch import PatchMahalanobis
from covguard.metrics import evaluate
from covguard.report import markdown_table

__all__ = [
    "GRIDS",
    "LAYER_CHOICES",
    "PROTOCOLS",
    "Chosen",
    "ValidationSplit",
    "choose",
    "choose_and_score",
    "grid_clones",
    "grid_points",
    "id_val_split",
    "ood_val_split",
    "point_label",
    "protocols_of",
    "report_config",
    "score_chosen",
    "select",
    "selection_markdown",
    "table_suffix",
    "validation_split",
]

#: ``--protocol`` values: fixed in advance (today's reports), validation (OpenOOD v1.5), both.
PROTOCOLS = ("fixed", "validation", "both")
#: Table titles of each protocol.
TITLES = {"fixed": "fixed-in-advance protocol", "validation": "validation protocol (OpenOOD v1.5)"}
#: Config fields of the protocol; a report written with ``protocol="fixed"`` leaves them out, so
#: it stays byte-identical to one written before the option existed (a missing field reads as
#: its default).
PROTOCOL_FIELDS = ("protocol", "n_id_val", "n_ood_val_classes")
#: Which tapped layers a patch method scores with: all of them fused (``"all"``), or one alone.
LAYER_CHOICES = ("all", *CIFAR_LAYERS)

#: The grid of every method under the validation protocol: method -> {parameter: values}; the
#: grid is the product of the values, in this order (which breaks ties).
#:
#: Baselines: OpenOOD v1.5's ``postprocessor_sweep`` (``configs/postprocessors/<name>.yml``) in
#: our constructors' parameter names (GEN's ``M`` is ``top_m``), with two notes. GEN's ``M`` is
#: capped at the K = 10 classes, so its three values are one configuration (the first wins the
#: tie). ViM's ``dim`` is ADAPTED: OpenOOD sweeps {256, 500, 1000} for its ResNet-18's 512-d
#: features (256 = C/2); the CIFAR ResNet-20/32/44 have C = 64 penultimate features, where
#: those values would all clip to C - 1, so the grid is {C/4, C/2, 3C/4} = {16, 32, 48}. Energy
#: keeps T = 1 (OpenOOD sweeps nothing); MSP, MaxLogit, MDS, RMDS have no hyperparameters.
#:
#: Ours: the variants of :data:`~covguard.bench.common.VARIANTS` (covariance form, aggregation,
#: class scoring, layer fusion; ``refit`` from the fitted detectors) and of
#: :data:`~covguard.bench.common.OWN_FIT_VARIANTS` (normalized features: fitted alongside, used
#: where the caller fitted them) times :data:`LAYER_CHOICES`. "class" is one
#: method whose grid holds top-1 and mixture scoring (so ``class_mahalanobis_mixture`` is no
#: separate method here); ``class_penultimate_original`` is the original authors' committed
#: configuration, scored as it is.
_OURS = (*VARIANTS, *OWN_FIT_VARIANTS)
GRIDS: dict[str, dict[str, tuple]] = {
    "class_mahalanobis": {"variant": tuple(v for v in _OURS if v.startswith("class-")), "layers": LAYER_CHOICES},
    "simple_mahalanobis": {"variant": tuple(v for v in _OURS if v.startswith("simple/")), "layers": LAYER_CHOICES},
    "class_penultimate_original": {},
    "msp": {},
    "max_logit": {},
    "energy": {"temperature": (1.0,)},
    "odin": {"temperature": (1.0, 10.0, 100.0, 1000.0), "noise": (0.0014, 0.0028)},
    "gen": {"gamma": (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0), "top_m": (10, 50, 100)},
    "mds": {},
    "rmds": {},
    "knn": {"k": (50, 100, 200, 500, 1000)},
    "vim": {"dim": (16, 32, 48)},
    "react": {"percentile": (85.0, 90.0, 95.0, 99.0)},
}
_PATCH_METHODS = ("class_mahalanobis", "simple_mahalanobis")


def check_protocol(protocol: str) -> tuple[str, ...]:
    """The protocols ``protocol`` runs, in report order; ValueError for an unknown name."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}")
    return ("fixed", "validation") if protocol == "both" else (protocol,)


def protocols_of(config: Mapping) -> tuple[str, ...]:
    """The protocols a report's config ran (a report without the field: fixed)."""
    return check_protocol(config.get("protocol", "fixed"))


def report_config(config) -> dict:
    """``asdict(config)`` as saved in ``results.json``: without :data:`PROTOCOL_FIELDS` when fixed."""
    saved = asdict(config)
    if saved["protocol"] == "fixed":
        for name in PROTOCOL_FIELDS:
            del saved[name]
    return saved


def table_suffix(protocols: Iterable[str], protocol: str) -> str:
    """``", <protocol title>"`` for a table heading; empty for a fixed-only report (unchanged headings)."""
    return "" if tuple(protocols) == ("fixed",) else f", {TITLES[protocol]}"


# ---- splits ---------------------------------------------------------------------------------


def id_val_split(n: int, n_val: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of an ID test set of ``n`` images.

    Returns
    -------
    val : Tensor of shape (n_val,)
        Indices of the ID-val images.
    test : Tensor of shape (n - n_val,)
        The other indices, ascending.
    """
    if not 0 < n_val < n:
        raise ValueError(f"n_id_val must be in [1, {n - 1}] for an ID test set of {n} images; got {n_val}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n_val], order[n_val:].sort().values


def ood_val_split(labels: Tensor, n_classes: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded class split of an OOD set: every image of ``n_classes`` drawn classes is OOD-val.

    Parameters
    ----------
    labels : Tensor of shape (N,)
        Class of each image, >= 0.
    n_classes : int
    seed : int

    Returns
    -------
    val, test : Tensor
        Indices of the OOD-val images and of the others, each ascending.
    classes : Tensor of shape (n_classes,)
        The OOD-val classes, ascending.
    """
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must all be >= 0: the OOD-val split draws whole classes")
    present = labels.unique()  # ascending
    if not 0 < n_classes < len(present):
        raise ValueError(f"n_ood_val_classes must be in [1, {len(present) - 1}] for {len(present)} classes; got {n_classes}")
    classes = present[torch.randperm(len(present), generator=torch.Generator().manual_seed(seed))[:n_classes]].sort().values
    is_val = torch.isin(labels, classes)
    return is_val.nonzero().flatten(), (~is_val).nonzero().flatten(), classes


@dataclass(frozen=True)
class ValidationSplit:
    """ID-val and OOD-val images, and what the test sets keep."""

    id_val: Tensor  # (n_id_val, 3, 32, 32) uint8
    ood_val: Tensor  # (n_ood_val, 3, 32, 32) uint8
    id_test_index: Tensor  # (N_id - n_id_val,) indices of the ID test images kept for testing
    ood_test_index: Tensor  # indices of the Tiny ImageNet images kept for testing
    ood_val_classes: tuple[str, ...]  # wnids of the OOD-val classes

    def describe(self) -> dict:
        """What ``results.json`` records of the split."""
        return {"id_val_images": len(self.id_val), "ood_val_images": len(self.ood_val), "ood_val_classes": list(self.ood_val_classes)}


def validation_split(id_test: ImageSet, tin: ImageSet, *, n_id_val: int, n_ood_val_classes: int, seed: int) -> ValidationSplit:
    """ID-val from the CIFAR-10 test set and OOD-val classes from Tiny ImageNet, both seeded."""
    id_val, id_test_index = id_val_split(len(id_test), n_id_val, seed)
    ood_val, ood_test_index, classes = ood_val_split(tin.labels, n_ood_val_classes, seed)
    names = tuple(tin.classes[c] if tin.classes else str(int(c)) for c in classes)
    return ValidationSplit(id_test.images[id_val], tin.images[ood_val], id_test_index, ood_test_index, names)


# ---- grids and selection --------------------------------------------------------------------


def grid_points(grid: Mapping[str, Iterable]) -> list[dict]:
    """Every point of a grid {parameter: values}, in product order; ``[{}]`` for an empty grid."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def point_label(point: Mapping) -> str:
    """``"temperature=1000, noise=0.0014"``; ``"default"`` for the empty point."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "default"


def select(val_auroc: Mapping[str, float]) -> str:
    """The grid point (label) of highest validation AUROC; ties go to the first in grid order."""
    if not val_auroc:
        raise ValueError("val_auroc must hold at least one grid point")
    return max(val_auroc, key=val_auroc.__getitem__)  # max keeps the first of equal values


def _is_default(det: Detector, point: Mapping) -> bool:
    params = det.get_params()
    return all(params[k] == v for k, v in point.items())


def _needs_fitted_clone(det: Detector) -> bool:
    """Fitted baselines whose grid changes what fit learns: a clone per point, fitted alongside."""
    return det.requires_fit and not isinstance(det, (KNN, PatchMahalanobis))


def grid_clones(detectors: Mapping[str, Detector]) -> dict[tuple[str, str], Detector]:
    """Unfitted clones of the grid points that need a fit of their own (ReAct's percentile, ViM's
    dim), {(method, point label): detector}; fit them with the detectors (``fit_on_train(also_fit=)``)."""
    out = {}
    for method, det in detectors.items():
        if method in GRIDS and _needs_fitted_clone(det):
            for point in grid_points(GRIDS[method]):
                if not _is_default(det, point):
                    out[(method, point_label(point))] = det.clone(**point)
    return out


@dataclass(frozen=True)
class Chosen:
    """One method's configuration, chosen on ID-val vs OOD-val."""

    config: dict  # the grid point
    val_auroc: float
    grid_auroc: dict[str, float] = field(repr=False)  # point label -> validation AUROC, grid order
    detector: Detector = field(repr=False)  # fitted, scoring this configuration
    layer: str | None = None  # None: the detector's own (fused) score; else this layer's raw score

    def to_dict(self) -> dict:
        """What ``results.json`` records."""
        return {"config": self.config, "val_auroc": self.val_auroc, "grid_auroc": self.grid_auroc}


def _methods(detectors: Mapping[str, Detector]) -> list[str]:
    """Methods of :data:`GRIDS` whose fitted detectors are all present (own-fit variants aside)."""
    def sources(method):
        return {VARIANTS[v][0] for v in GRIDS[method]["variant"] if v in VARIANTS} if method in _PATCH_METHODS else {method}

    return [m for m in GRIDS if sources(m) <= set(detectors)]


def _points(method: str, detectors: Mapping[str, Detector]) -> list[dict]:
    """The grid points of ``method``, without own-fit variants the caller did not fit."""
    points = grid_points(GRIDS[method])
    if method not in _PATCH_METHODS:
        return points
    return [p for p in points if p["variant"] not in OWN_FIT_VARIANTS or p["variant"] in detectors]


def _candidate(method: str, point: dict, detectors, clones, holdout, progress: bool) -> Detector:
    """The fitted detector of a grid point (without the layer choice)."""
    if method in _PATCH_METHODS and point["variant"] in OWN_FIT_VARIANTS:
        return detectors[point["variant"]]
    if method in _PATCH_METHODS:
        source, changes = VARIANTS[point["variant"]]
        det = detectors[source]
        return det.refit(holdout=holdout, progress=progress, **changes) if changes else det
    det = detectors[method]
    if _is_default(det, point):
        return det
    if isinstance(det, KNN):
        return det.with_k(**point)
    return clones[(method, point_label(point))] if det.requires_fit else det.clone(**point)


def choose(
    detectors: Mapping[str, Detector],
    clones: Mapping[tuple[str, str], Detector],
    *,
    holdout: Iterable | None,
    id_val: Tensor,
    ood_val: Tensor,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Chosen]:
    """Each method's configuration of highest AUROC, ID-val (negatives) vs OOD-val (positives).

    Parameters
    ----------
    detectors : dict of str to Detector
        The fitted detectors (``fit_on_train``): our patch detectors with ``keep_moments``, the
        baselines and any :data:`OWN_FIT_VARIANTS`, by name. A method of :data:`GRIDS` is chosen
        when its detectors are present; an own-fit variant joins its grid when present.
    clones : dict
        :func:`grid_clones` of the baselines, fitted.
    holdout : iterable or None
        Held-out in-distribution training images that standardize the layers of refit variants.
    id_val, ood_val : Tensor of shape (N, 3, H, W)
        Validation images, [0, 1] floats.
    batch_size : int
    progress : bool

    Returns
    -------
    dict of str to Chosen
        By method, in :data:`GRIDS` order.
    """
    methods = _methods(detectors)
    candidates, where = {}, {}  # candidate key -> detector; (method, full point label) -> (point, key, layer)
    for method in methods:
        for point in _points(method, detectors):
            fit_point = {k: v for k, v in point.items() if k != "layers"}
            key = f"{method} | {point_label(fit_point)}"
            if key not in candidates:
                candidates[key] = _candidate(method, fit_point, detectors, clones, holdout, progress)
            layer = point.get("layers", "all")
            where[(method, point_label(point))] = (point, key, None if layer == "all" else layer)
    scored_id = score_detectors(candidates, id_val, batch_size=batch_size, progress=progress)
    scored_ood = score_detectors(candidates, ood_val, batch_size=batch_size, progress=progress)
    chosen = {}
    for method in methods:
        aurocs = {}
        for (m, label), (_, key, layer) in where.items():
            if m == method:
                (s_in, l_in), (s_out, l_out) = scored_id[key], scored_ood[key]
                aurocs[label] = evaluate(s_in, s_out).auroc if layer is None else evaluate(l_in[layer], l_out[layer]).auroc
        best = select(aurocs)
        point, key, layer = where[(method, best)]
        chosen[method] = Chosen(point, aurocs[best], aurocs, candidates[key], layer)
    return chosen


def score_chosen(chosen: Mapping[str, Chosen], x: Tensor, *, batch_size: int = 256) -> dict[str, tuple[Tensor, dict]]:
    """Scores of images (N, C, H, W) under each chosen configuration, as ``score_detectors`` returns
    them (per method: scores (N,) and an empty layer dict), one forward pass per batch."""
    scored = score_detectors({m: c.detector for m, c in chosen.items()}, x, batch_size=batch_size)
    return {m: (scored[m][0] if c.layer is None else scored[m][1][c.layer], {}) for m, c in chosen.items()}


def choose_and_score(
    detectors: Mapping[str, Detector], clones: Mapping, split: ValidationSplit, holdout: Iterable, *, batch_size: int = 256,
    progress: bool = False,
) -> tuple[dict, Callable[[Tensor], dict]]:
    """:func:`choose` on the split's ID-val and OOD-val images; returns the selection as
    ``results.json`` records it and a scorer ``x -> score_chosen(chosen, x)`` of the test images."""
    chosen = choose(detectors, clones, holdout=holdout, id_val=split.id_val.float() / 255, ood_val=split.ood_val.float() / 255,
                    batch_size=batch_size, progress=progress)
    return {m: c.to_dict() for m, c in chosen.items()}, lambda x: score_chosen(chosen, x, batch_size=batch_size)


# ---- report ---------------------------------------------------------------------------------


def selection_markdown(results: dict) -> list[str]:
    """The "chosen configuration per method" section: per checkpoint, the point and its validation AUROC."""
    models = {name: m["validation"]["selection"] for name, m in results["models"].items() if "validation" in m}
    if not models:
        return []
    split = results["validation_split"]
    first = next(iter(models.values()))
    rows = [
        {"method": method, "grid size": len(first[method]["grid_auroc"]),
         **{name: f"{point_label(sel[method]['config'])} ({sel[method]['val_auroc'] * 100:.1f})" for name, sel in models.items()}}
        for method in first
    ]
    return [
        "## Validation protocol (OpenOOD v1.5): chosen configuration per method",
        "",
        f"ID-val: {split['id_val_images']} CIFAR-10 test images (seeded), removed from the ID test set. OOD-val: the "
        f"{split['ood_val_images']} Tiny ImageNet images of {len(split['ood_val_classes'])} seeded classes, removed from "
        "the TIN test set; every table of this report is scored without them, whatever its protocol. Every method keeps the grid point of highest validation AUROC (ID-val vs OOD-val; ties: first "
        "in grid order), then that one configuration is scored on every test set: no test set or attack chooses. Grids "
        "(`covguard.bench.validation.GRIDS`): OpenOOD v1.5's sweeps for the baselines (ViM's dim adapted to 64-d features: "
        "16, 32, 48); ours: the variants (covariance form, aggregation, class scoring, layer fusion, and normalized "
        "features where fitted) times the layers (all fused, or one alone). Cells: chosen point (validation AUROC %), per checkpoint.",
        "",
        markdown_table(rows, ["method", "grid size", *models]),
        "",
    ]
