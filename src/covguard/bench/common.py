"""Pieces shared by the real-data benchmarks: checkpoints, data splits, detector line-ups, tables."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from pathlib import Path

import torch
from torch import Tensor, nn

from covguard.data.batches import ImageBatches
from covguard.data.images import ImageSet
from covguard.detectors import ClassMahalanobis, Detector, SimpleMahalanobis
from covguard.detectors.baselines import BASELINES
from covguard.detectors.multi import fit_detectors
from covguard.features import model_device
from covguard.models import cifar_resnet

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_KINDS",
    "CIFAR_LAYERS",
    "CIFAR_MODELS",
    "FORMS",
    "OWN_FIT_VARIANTS",
    "VARIANTS",
    "accuracy",
    "CIFAR_TAPS",
    "Taps",
    "add_mixture",
    "baseline_detectors",
    "checkpoint_path",
    "fit_on_train",
    "finetuned_path",
    "format_mean_std",
    "load_cifar_model",
    "mean_std",
    "patch_detectors",
    "predict",
    "split_train",
    "weights_description",
]

#: Shared pretrained CIFAR-10 checkpoints (see ../shared/data/README.md).
CIFAR_MODELS = ("resnet20", "resnet32", "resnet44")
#: Which weights a benchmark runs: the shared ones, or those fine-tuned on the JPEG training set.
CHECKPOINT_KINDS = ("original", "finetuned")
#: Where the repository keeps its fine-tuned weights.
CHECKPOINT_DIR = Path(__file__).resolve().parents[3] / "checkpoints"
#: The four stages tapped on the CIFAR ResNets; ``avgpool`` is the pooled penultimate feature.
CIFAR_LAYERS = ("layer1", "layer2", "layer3", "avgpool")
#: Baselines that read the pooled penultimate features (``feature_layer``), and those that also need
#: the final linear layer (``fc_layer``).
PENULTIMATE_BASELINES = ("mds", "rmds", "knn", "vim", "react")
FC_BASELINES = ("vim", "react")


@dataclass(frozen=True)
class Taps:
    """Where a benchmark taps a classifier: patch-detector layers and the baselines' layers."""

    layers: tuple[str, ...] = CIFAR_LAYERS  # modules scored by the patch detectors
    kernel_size: Mapping[str, int] = field(default_factory=dict)  # layer -> patch side; default 1 for feature_layer, else 3
    feature_layer: str | None = "avgpool"  # pooled penultimate features (N, C, 1, 1); None: no such layer
    fc_layer: str | None = "linear"  # the final nn.Linear; None: no such layer

    def kernels(self) -> dict[str, int]:
        """Patch side per layer."""
        return {layer: self.kernel_size.get(layer, 1 if layer == self.feature_layer else 3) for layer in self.layers}

    def usable(self, baselines: Sequence[str]) -> tuple[str, ...]:
        """The baselines these taps can wire (those needing a missing layer left out)."""
        return tuple(b for b in baselines if not (b in PENULTIMATE_BASELINES and self.feature_layer is None)
                     and not (b in FC_BASELINES and self.fc_layer is None))

    def baselines_of(self, model: nn.Module, names: Sequence[str]) -> dict[str, Detector]:
        """:func:`baseline_detectors` of the usable ``names``, wired to these layers."""
        return baseline_detectors(model, self.usable(names), fc_layer=self.fc_layer or "linear",
                                  feature_layer=self.feature_layer or "avgpool")


#: The CIFAR ResNets' taps (the default of every benchmark).
CIFAR_TAPS = Taps()
#: Covariance forms of the variant sweep: name -> changes passed to ``refit``.
FORMS = {
    "full": {},
    "full-oas": {"shrinkage": "oas"},
    "diag": {"covariance": "diag"},
    "lowrank-16": {"covariance": "lowrank", "rank": 16},
    "lowrank-64": {"covariance": "lowrank", "rank": 64},
}
#: Variants of our patch detectors (``bench ood --variants``; the grid of the validation protocol):
#: name (detector/covariance form/aggregation) -> (fitted detector it derives from, changes passed
#: to ``refit``). ``*/full/mean`` are the main detectors themselves.
VARIANTS: dict[str, tuple[str, dict]] = {
    **{f"{kind}/{form}/mean": (det, changes)
       for kind, det in (("simple", "simple_mahalanobis"), ("class-top1", "class_mahalanobis_top1"))
       for form, changes in FORMS.items()},
    "simple/full/max": ("simple_mahalanobis", {"aggregate": "max"}),
    "class-top1/full/max": ("class_mahalanobis_top1", {"aggregate": "max"}),
    "simple/full/top10": ("simple_mahalanobis", {"aggregate": "topq", "top_fraction": 0.1}),
    "class-top1/full/top10": ("class_mahalanobis_top1", {"aggregate": "topq", "top_fraction": 0.1}),
    "class-mixture/full/mean": ("class_mahalanobis_top1", {"scoring": "mixture"}),
    # a fourth name part marks an option beyond covariance form and aggregation
    "class-top1/full/mean/relative": ("class_mahalanobis_top1", {"relative": True}),  # shared form from the kept class moments
    **{f"{kind}/full/mean/fusion-{fusion}": (det, {"fusion": fusion})
       for kind, det in (("simple", "simple_mahalanobis"), ("class-top1", "class_mahalanobis_top1"))
       for fusion in ("max", "gaussian")},
}
#: Variants the fitted state cannot give (other statistics): cloned with these changes and fitted
#: on the same fit images, in one joint pass.
OWN_FIT_VARIANTS: dict[str, tuple[str, dict]] = {
    "simple/full/mean/normalized": ("simple_mahalanobis", {"normalize": "position"}),
    "class-top1/full/mean/normalized": ("class_mahalanobis_top1", {"normalize": "position"}),
}


def checkpoint_path(root: Path, name: str) -> Path:
    """The checkpoint file ``models/<name>-*.th`` under the data root."""
    found = sorted((root / "models").glob(f"{name}-*.th"))
    if not found:
        raise FileNotFoundError(f"no checkpoint for model {name!r}: expected {str(root / 'models' / (name + '-*.th'))!r}")
    return found[0]


def finetuned_path(name: str, checkpoint_dir: str | Path | None = None) -> Path:
    """The fine-tuned weights ``<checkpoint_dir>/<name>-jpeg.safetensors`` (``covguard finetune``).

    ``checkpoint_dir`` defaults to ``$COVGUARD_CHECKPOINTS``, else the ``checkpoints/`` folder of
    the source checkout, where the repository keeps them.
    """
    if checkpoint_dir is None:
        checkpoint_dir = os.environ.get("COVGUARD_CHECKPOINTS") or CHECKPOINT_DIR
    return Path(checkpoint_dir) / f"{name}-jpeg.safetensors"


def weights_description(config: dict) -> str:
    """Which weights a report's models ran with (reports written before the option: the shared ones)."""
    if config.get("checkpoints", "original") == "finetuned":
        return "fine-tuned on the JPEG training set, checkpoints/"
    return "shared weights, trained on lossless CIFAR-10"


def load_cifar_model(
    root: Path, name: str, device: str | torch.device = "cpu", *, checkpoints: str = "original",
    checkpoint_dir: str | Path | None = None,
) -> nn.Module:
    """A CIFAR ResNet in eval mode on ``device``: the shared pretrained weights (``"original"``)
    or those fine-tuned on the JPEG training set (``"finetuned"``, :func:`finetuned_path`)."""
    if name not in CIFAR_MODELS:
        raise ValueError(f"model must be one of {CIFAR_MODELS}; got {name!r}")
    if checkpoints not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoints must be one of {CHECKPOINT_KINDS}; got {checkpoints!r}")
    if checkpoints == "original":
        path = checkpoint_path(root, name)
    else:
        path = finetuned_path(name, checkpoint_dir)
        if not path.is_file():
            raise FileNotFoundError(f"no fine-tuned checkpoint for model {name!r}: expected {str(path)!r} (covguard finetune writes it)")
    return cifar_resnet(name, path).to(device).eval()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    """Predicted classes (N,) on the CPU, in batches."""
    device = model_device(model)
    return torch.cat([model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on images (N, C, H, W) with labels (N,)."""
    return (predict(model, x, batch_size=batch_size) == y).float().mean().item()


def patch_detectors(
    model: nn.Module, layers: Sequence[str] = CIFAR_LAYERS, *, covariance: str = "full", keep_moments: bool = False,
    kernel_size: Mapping[str, int] | None = None, feature_layer: str | None = "avgpool",
) -> dict[str, Detector]:
    """Our patch detectors on ``layers`` (the pooled ``feature_layer`` scored with 1x1 patches, the
    others with 3x3 unless ``kernel_size`` says otherwise).

    ``class_mahalanobis_mixture`` is created after fitting by :func:`add_mixture` (same
    statistics as ``class_mahalanobis_top1``, other scoring), so it is not listed here.
    ``class_penultimate_original`` is the original authors' committed configuration:
    penultimate features, per-class covariances with ``tr(S)/D/100 * I``, top-1 class, only
    correctly classified fit images. ``keep_moments`` lets Simple and Class top-1 derive other
    covariance forms afterwards (:meth:`~covguard.detectors.patch.PatchMahalanobis.refit`).
    """
    kernel = Taps(tuple(layers), kernel_size or {}, feature_layer).kernels()
    common = {"layers": layers, "covariance": covariance, "kernel_size": kernel, "keep_moments": keep_moments, "fit_positions": 1.0}
    dets: dict[str, Detector] = {
        "simple_mahalanobis": SimpleMahalanobis(model, **common),
        "class_mahalanobis_top1": ClassMahalanobis(model, scoring="top1", **common),
    }
    if feature_layer is not None and feature_layer in layers:
        dets["class_penultimate_original"] = ClassMahalanobis(
            model, layers=[feature_layer], kernel_size=1, class_weights="correct", eps=0.01, scoring="top1", covariance="full",
            fit_positions=1.0,
        )
    return dets


def add_mixture(detectors: dict[str, Detector], holdout: Iterable, *, top_m: int = 3, progress: bool = False) -> None:
    """Add ``class_mahalanobis_mixture``: the fitted top-1 class detector scored as a mixture.

    Class statistics do not depend on the scoring rule, so the fitted forms are shared; the
    layer scores of the new scoring are standardized anew on ``holdout`` (held-out
    in-distribution images).
    """
    top1 = detectors["class_mahalanobis_top1"]
    detectors["class_mahalanobis_mixture"] = top1.refit(holdout=holdout, scoring="mixture", top_m=top_m, progress=progress)


def baseline_detectors(
    model: nn.Module, names: Sequence[str], *, fc_layer: str = "linear", feature_layer: str = "avgpool"
) -> dict[str, Detector]:
    """The named baselines from ``BASELINES``, wired to the model's penultimate and final linear layers."""
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"baselines {unknown} are unknown; choose from {sorted(BASELINES)}")
    out = {}
    for name in names:
        kwargs = {"feature_layer": feature_layer} if name in PENULTIMATE_BASELINES else {}
        kwargs.update({"fc_layer": fc_layer} if name in FC_BASELINES else {})
        out[name] = BASELINES[name](model, **kwargs)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], *, scale: float = 100.0, digits: int = 1) -> str:
    """``"91.2 ± 0.4"`` (percent by default); one value prints without ``±``."""
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f}" if len(values) == 1 else f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"



def split_train(
    train: ImageSet, *, n_holdout: int, max_train: int | None, seed: int, batch_size: int
) -> tuple[ImageBatches, ImageBatches]:
    """Seeded split of the training set: (fit batches, held-out batches of ``n_holdout`` images).

    The fit part holds the rest, at most ``max_train`` images.
    """
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    hold_idx, fit_idx = order[:n_holdout], order[n_holdout:]
    if max_train is not None:
        fit_idx = fit_idx[:max_train]
    return (
        ImageBatches(train.images[fit_idx], train.labels[fit_idx], batch_size),
        ImageBatches(train.images[hold_idx], train.labels[hold_idx], batch_size),
    )


def fit_on_train(
    model: nn.Module,
    train: ImageSet,
    *,
    baselines: Sequence[str],
    covariance: str = "full",
    n_holdout: int = 5000,
    max_train: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    mixture: bool = True,
    keep_moments: bool = False,
    also_fit: Sequence[Detector] = (),
    own_fit: Mapping[str, tuple[str, dict]] = MappingProxyType({}),
    derived: Mapping[str, tuple[str, dict]] = MappingProxyType({}),
    progress: bool = True,
    taps: Taps = CIFAR_TAPS,
) -> tuple[dict[str, Detector], dict[str, int]]:
    """Our patch detectors and the baselines, fitted together on the training set.

    ``n_holdout`` training images (seeded permutation, :func:`split_train`) are held out from
    the fit and only standardize the layer scores; the rest (at most ``max_train``) fit every
    detector. ``also_fit``: more detectors of the same model fitted in the same passes over the
    data (the grid points of the validation protocol); they are fitted in place, not returned.
    ``own_fit``: name -> (patch detector, changes), clones of our detectors with other statistics
    (:data:`OWN_FIT_VARIANTS`), fitted in the same passes and returned under their names.
    ``derived``: name -> (fitted detector, changes), more detectors derived from fitted ones with
    ``refit`` (another scoring or layer fusion; no pass over the fit data), standardized on the
    held-out images. ``taps``: the layers of the patch detectors and baselines (default: the CIFAR
    ResNets'); baselines that need a layer ``taps`` lacks are left out (:meth:`Taps.usable`).

    Returns
    -------
    detectors : dict of str to Detector
        Including ``class_mahalanobis_mixture`` when ``mixture`` (see :func:`add_mixture`).
    sizes : dict
        ``{"n_fit": ..., "n_holdout": ...}``.
    """
    fit_loader, hold_loader = split_train(train, n_holdout=n_holdout, max_train=max_train, seed=seed, batch_size=batch_size)
    detectors = {
        **patch_detectors(model, taps.layers, covariance=covariance, keep_moments=keep_moments, kernel_size=taps.kernel_size,
                          feature_layer=taps.feature_layer),
        **taps.baselines_of(model, baselines),
    }
    detectors.update({name: detectors[base].clone(**{"keep_moments": False, **changes}) for name, (base, changes) in own_fit.items()})
    fit_detectors([*detectors.values(), *also_fit], fit_loader, holdout=hold_loader, progress=progress)
    if mixture:
        add_mixture(detectors, hold_loader, progress=progress)
    for name, (base, changes) in derived.items():
        detectors[name] = detectors[base].refit(holdout=hold_loader, progress=progress, **changes)
    return detectors, {"n_fit": len(fit_loader.images), "n_holdout": len(hold_loader.images)}
