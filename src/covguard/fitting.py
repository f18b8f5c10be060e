"""Build a calibrated guard from training images: the library side of ``covguard fit``.

The images come from :func:`covguard.data.training_images.read_training_images`. A seeded share
of them (``calibration_fraction``) is held out: it alone standardizes the layer scores and sets
the threshold (:meth:`covguard.Guard.calibrate`); the rest fits the detector's statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from covguard.detectors import ClassMahalanobis, SimpleMahalanobis
from covguard.data.training_images import TrainingImages
from covguard.detectors.layer_fusion import FUSIONS
from covguard.detectors.patch import DEFAULT_FORM
from covguard.features import FeatureTap, eval_mode, model_device, model_dtype
from covguard.guard import Guard

__all__ = [
    "DETECTOR_KINDS",
    "FitConfig",
    "FitSummary",
    "default_layers",
    "fit_guard",
    "input_channels",
    "split_calibration",
]

logger = logging.getLogger(__name__)

#: ``--detector`` name -> detector class.
DETECTOR_KINDS = {"class": ClassMahalanobis, "simple": SimpleMahalanobis}
_MIN_CALIBRATION = 2  # images that standardize layer scores (a variance needs two)


# ---- the model ---------------------------------------------------------------------------------


def input_channels(model: nn.Module) -> int:
    """Input channels of a classifier: ``in_channels`` of its first ``Conv2d``.

    Raises
    ------
    ValueError
        The model has no ``Conv2d`` (pass the channels explicitly) or it reads neither 1 nor 3 channels.
    """
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("cannot tell the model's input channels (it has no Conv2d): pass --channels 1 or 3")
    if conv.in_channels not in (1, 3):
        raise ValueError(f"the model's first Conv2d reads {conv.in_channels} channels; image files give 1 (grey) or 3 (RGB)")
    return conv.in_channels


def _probe(model: nn.Module, x: Tensor, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and feature maps of one image, with model errors reported as input errors."""
    try:
        with eval_mode(model), torch.no_grad(), FeatureTap(model, layers) as tap:
            return tap(x)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"the model fails on a training image of shape {tuple(x.shape)}: {type(err).__name__}: {err}"
        ) from err


def default_layers(model: nn.Module, x: Tensor, kernel_size: int = 3) -> tuple[str, ...]:
    """The model's stages: ``model.feature_layers`` whose maps hold at least one ``kernel_size`` patch on ``x``.

    Parameters
    ----------
    model : nn.Module
    x : Tensor of shape (1, C, H, W)
        One input image (sets the map sizes).
    kernel_size : int

    Raises
    ------
    ValueError
        The model lists no ``feature_layers``, or none of them gives a large enough map.
    """
    names = getattr(model, "feature_layers", None)
    if not names:
        convs = [name for name, m in model.named_modules() if name and isinstance(m, (nn.Conv2d, nn.Sequential))]
        raise ValueError(
            "--layers is required: the model has no feature_layers attribute naming its stages; "
            f"pick modules that output (N, C, H, W) maps, e.g. among {convs[:12]}"
        )
    _, feats = _probe(model, x, names)
    layers = tuple(n for n, f in feats.items() if f.ndim == 4 and min(f.shape[-2:]) >= kernel_size)
    dropped = [n for n in names if n not in layers]
    if dropped:
        logger.info("default layers: %s (dropped %s: maps smaller than %dx%d)", layers, dropped, kernel_size, kernel_size)
    if not layers:
        raise ValueError(f"none of the model's feature_layers {list(names)} outputs a map of at least {kernel_size}x{kernel_size}")
    return layers


# ---- split, fit, calibrate ---------------------------------------------------------------------


def split_calibration(n: int, fraction: float, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded split of ``n`` images into a fit part and a held-out calibration part.

    Parameters
    ----------
    n : int
    fraction : float
        Share held out, in (0, 1); ``round(fraction * n)`` images.
    seed : int

    Returns
    -------
    fit_index, calibration_index : Tensor of shape (n - m,) and (m,), int64, each sorted
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--calibration-fraction must be in (0, 1); got {fraction}")
    m = round(fraction * n)
    if m < _MIN_CALIBRATION or n - m < 1:
        raise ValueError(
            f"--calibration-fraction {fraction} of {n} images holds out {m} and fits on {n - m}: at least "
            f"{_MIN_CALIBRATION} held-out images and 1 fit image are needed (use more images or another fraction)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[m:].sort().values, order[:m].sort().values


class _Batches:
    """Re-iterable batches of ``data`` at ``index``: float32 images, with labels where known."""

    def __init__(self, data: TrainingImages, index: Tensor, batch_size: int, dtype: torch.dtype, with_labels: bool) -> None:
        self.data, self.index, self.batch_size, self.dtype = data, index, batch_size, dtype
        self.with_labels = with_labels and data.labels is not None

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        for start in range(0, len(self.index), self.batch_size):
            rows = self.index[start : start + self.batch_size]
            x = self.data.float(rows).to(self.dtype)  # (n, C, H, W)
            yield (x, self.data.labels[rows]) if self.with_labels else x


@dataclass(frozen=True)
class FitConfig:
    """What ``covguard fit`` fits (the CLI options)."""

    detector: str = "class"  # "class" (labels, class-conditional) or "simple" (one Gaussian per layer)
    layers: tuple[str, ...] | None = None  # None: the model's feature_layers with maps of >= 3x3
    covariance: str = DEFAULT_FORM["covariance"]  # "full", "diag" or "lowrank"
    rank: int = DEFAULT_FORM["rank"]  # eigenpairs kept by "lowrank"
    fit_positions: float = DEFAULT_FORM["fit_positions"]  # share of each fit image's patch positions accumulated
    # layer fusion: "gaussian" is two-sided, so a deployed guard also flags inputs too typical in some
    # layers, such as blank frames, which the sum of z-scores passes (results/suite)
    fusion: str = "gaussian"
    calibration_fraction: float = 0.1  # held-out share: standardizes layer scores and sets the threshold
    tpr: float = 0.95  # share of held-out in-distribution images accepted
    batch_size: int = 64
    seed: int = 0  # of the calibration split
    progress: bool = True

    def __post_init__(self) -> None:
        if self.detector not in DETECTOR_KINDS:
            raise ValueError(f"--detector must be one of {sorted(DETECTOR_KINDS)}; got {self.detector!r}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(f"--calibration-fraction must be in (0, 1); got {self.calibration_fraction}")
        if not 0.0 < self.tpr <= 1.0:
            raise ValueError(f"--tpr must be in (0, 1]; got {self.tpr}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1; got {self.batch_size}")
        if self.rank < 1:
            raise ValueError(f"--rank must be >= 1; got {self.rank}")
        if not 0.0 < self.fit_positions <= 1.0:
            raise ValueError(f"--fit-positions must be in (0, 1]; got {self.fit_positions}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"--fusion must be one of {FUSIONS}; got {self.fusion!r}")


@dataclass(frozen=True)
class FitSummary:
    """What a fit used and produced."""

    n_fit: int
    n_calibration: int
    classes: tuple[str, ...]
    layers: tuple[str, ...]
    input_shape: tuple[int, int, int]
    threshold: float
    tpr: float
    achieved_tpr: float
    seconds: float

    def render(self, out: str | Path) -> str:
        """The summary ``covguard fit`` prints."""
        c, h, w = self.input_shape
        labels = f", {len(self.classes)} classes" if self.classes else ", unlabeled"
        return (
            f"fitted on {self.n_fit} images, calibrated on {self.n_calibration} held out ({c}x{h}x{w}{labels})\n"
            f"layers: {', '.join(self.layers)}\n"
            f"threshold: {self.threshold:.6g} (accepts {100 * self.achieved_tpr:.1f}% of the held-out images, "
            f"target {100 * self.tpr:.1f}%)\n"
            f"fit time: {self.seconds:.1f} s; wrote {out}"
        )


def fit_guard(model: nn.Module, data: TrainingImages, config: FitConfig) -> tuple[Guard, FitSummary]:
    """Fit a detector on ``data`` minus a seeded held-out share, standardize and calibrate on that share.

    Parameters
    ----------
    model : nn.Module
        Trained classifier in eval mode, images (N, C, H, W) in ``[0, 1]`` -> logits (N, K).
    data : TrainingImages
        Labeled (as many classes as the model has outputs) for ``detector="class"``.
    config : FitConfig

    Returns
    -------
    guard : Guard
        Fitted and calibrated.
    summary : FitSummary
    """
    tic = time.perf_counter()
    dtype = model_dtype(model)
    probe = data.float(torch.tensor([0])).to(dtype=dtype, device=model_device(model))  # (1, C, H, W)
    layers = config.layers or default_layers(model, probe)
    logits, _ = _probe(model, probe, layers)
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits (N, K); got shape {tuple(logits.shape)}")
    labeled = config.detector == "class"
    if labeled:
        if data.labels is None:
            raise ValueError("--detector class needs labeled images in <class>/<image> folders")
        if len(data.classes) != logits.shape[1]:
            raise ValueError(
                f"--train {data.source!r} has {len(data.classes)} class folders ({list(data.classes)[:5]}...) but the "
                f"model has {logits.shape[1]} outputs: labels follow the sorted folder names, one folder per class"
            )
    fit_index, cal_index = split_calibration(len(data), config.calibration_fraction, seed=config.seed)
    fit_batches = _Batches(data, fit_index, config.batch_size, dtype, with_labels=labeled)
    cal_batches = _Batches(data, cal_index, config.batch_size, dtype, with_labels=False)
    detector = DETECTOR_KINDS[config.detector](
        model, layers=layers, covariance=config.covariance, rank=config.rank, fit_positions=config.fit_positions, fusion=config.fusion
    )
    detector.fit(fit_batches, holdout=cal_batches, progress=config.progress)
    guard = Guard(model, detector).calibrate(cal_batches, tpr=config.tpr, progress=config.progress)
    calibration = guard.calibration_
    summary = FitSummary(
        n_fit=len(fit_index), n_calibration=len(cal_index), classes=data.classes if labeled else (),
        layers=tuple(layers), input_shape=tuple(data.images.shape[1:]), threshold=calibration.threshold,
        tpr=calibration.tpr, achieved_tpr=calibration.achieved_tpr, seconds=time.perf_counter() - tic,
    )
    return guard, summary
