"""Fit and score several detectors of one model with one forward pass per batch.

Benchmarks compare many detectors on the same model; fitting each on its own would run the
network once per detector over the whole training set. :func:`fit_detectors` captures the union
of their layers once per batch and feeds each detector its share through the features-level
API (``partial_fit`` / ``finish_fit``), pass by pass: a detector that reads its data twice
(ViM, Class with ``basis_rank``) takes part in the second pass too. A Simple detector fitted
next to a Class detector with label weights on the same layers takes its moments from the Class
statistics (the one-hot groups pooled with Chan's merge: the moments of every patch), so those
patches are reduced once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.detectors.base import Detector, check_finite_features, unpack_batch
from covguard.detectors.class_mahalanobis import ClassMahalanobis
from covguard.detectors.patch import PatchMahalanobis
from covguard.detectors.simple_mahalanobis import SimpleMahalanobis
from covguard.features import FeatureTap, eval_mode, model_device

__all__ = ["fit_detectors", "score_detectors"]


def fit_detectors(
    detectors: Sequence[Detector],
    loader: Iterable,
    *,
    holdout: Iterable | None = None,
    progress: bool = True,
) -> list[Detector]:
    """Fit detectors of the same model together; equivalent to calling each one's ``fit``.

    Parameters
    ----------
    detectors : sequence of Detector
        Detectors sharing one model. Those needing no fit are skipped.
    loader : iterable of Tensor (N, C, H, W) or of tuples (x, y)
        In-distribution training images (and labels); re-iterable when a detector reads it
        more than once.
    holdout : iterable, optional
        Held-out in-distribution images that fit the layer fusion of patch detectors that need
        one (as :meth:`PatchMahalanobis.fit`); ``loader`` is used again when None.
    progress : bool

    Returns
    -------
    list of Detector
        The same detectors, fitted.
    """
    detectors = list(detectors)
    if not detectors:
        raise ValueError("detectors must hold at least one detector")
    model = detectors[0].model
    if any(det.model is not model for det in detectors):
        raise ValueError("detectors must all wrap the same model object")
    fitted = [det for det in detectors if det.requires_fit]
    passes = max((det.fit_passes for det in fitted), default=0)
    if passes > 1 and iter(loader) is loader:
        raise TypeError("loader must be re-iterable (a list or a DataLoader, not a one-shot iterator): some detectors read it twice")
    pooled = _pooled_sources(fitted)
    for index in range(passes):
        active = [det for det in fitted if det.fit_passes > index]
        fed = [det for det in active if index > 0 or det not in pooled]
        shape = None
        for b, (x, logits, feats, y) in enumerate(_batches(fed, model, loader, progress, f"fit {len(fed)} detectors")):
            shape = shape or tuple(x.shape[1:])
            check_finite_features(feats, f"batch {b}")
            for det in fed:
                det.partial_fit(logits, {layer: feats[layer] for layer in det.layers}, y)
        if shape is None:
            raise ValueError("loader is empty: fit needs at least one batch of in-distribution images")
        for det, src in pooled.items():
            if index == 0:
                moments = src.accumulated_moments()
                det.fit_moments({layer: moments[layer].pooled() for layer in det.layers}, input_shape=shape)
        for det in fed:
            det.finish_fit(input_shape=shape)
    fused = [det for det in fitted if isinstance(det, PatchMahalanobis) and det.needs_holdout]
    if fused:
        _standardize(fused, model, holdout if holdout is not None else loader, progress)
    return detectors


def _layers(detectors: Sequence[Detector]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(layer for det in detectors for layer in det.layers))


def _batches(
    detectors: Sequence[Detector], model: nn.Module, loader: Iterable, progress: bool, desc: str
) -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor], Tensor | None]]:
    """Yield (x, logits, feats, y) with one forward over the union of the detectors' layers."""
    device = model_device(model)
    total = len(loader) if hasattr(loader, "__len__") else None
    with eval_mode(model), torch.no_grad(), FeatureTap(model, _layers(detectors)) as tap:
        for batch in tqdm(loader, desc=desc, total=total, disable=not progress, leave=False):
            x, y = unpack_batch(batch)
            if x.shape[0] == 0:
                continue
            x = detectors[0].check_input(x)
            logits, feats = tap(x)
            yield x, logits, feats, None if y is None else y.to(device)


def _pooled_sources(detectors: Sequence[Detector]) -> dict[Detector, ClassMahalanobis]:
    """Simple detectors whose moments equal the pooled moments of a label-weighted one-pass Class
    detector of the same layers, patch geometry and feature normalization, both accumulating every
    patch position exactly: {Simple detector: that Class detector}."""
    sources = [
        det for det in detectors
        if isinstance(det, ClassMahalanobis) and det.class_weights == "label" and det.fit_passes == 1
        and det.exact_moments and det.fit_positions == 1
    ]
    out = {}
    for det in detectors:
        if type(det) is not SimpleMahalanobis or det.fit_positions != 1:
            continue
        for src in sources:
            if src.normalize == det.normalize and all(
                layer in src.gaussians
                and (src.gaussians[layer].kernel_size, src.gaussians[layer].padding)
                == (det.gaussians[layer].kernel_size, det.gaussians[layer].padding)
                for layer in det.layers
            ):
                out[det] = src
                break
    return out


def _standardize(detectors: Sequence[PatchMahalanobis], model: nn.Module, loader: Iterable, progress: bool) -> None:
    per_layer: list[list[Tensor]] = [[] for _ in detectors]
    for _, logits, feats, _ in _batches(detectors, model, loader, progress, "standardize"):
        for out, det in zip(per_layer, detectors):
            out.append(det.layer_scores_features(logits, {layer: feats[layer] for layer in det.layers}).cpu())
    for out, det in zip(per_layer, detectors):
        det.set_standardization(torch.cat(out))


def _shares_scoring(det: Detector) -> bool:
    """Whether the detector scores from one plain forward (ODIN, e.g., perturbs its input first)."""
    return type(det).score is Detector.score


@torch.no_grad()
def score_detectors(
    detectors: dict[str, Detector], x: Tensor, *, batch_size: int = 256, progress: bool = False
) -> dict[str, tuple[Tensor, dict[str, Tensor]]]:
    """Score images with several detectors of one model, one forward pass per batch.

    Parameters
    ----------
    detectors : dict of str to Detector
        Fitted detectors sharing one model.
    x : Tensor of shape (N, C, H, W)
    batch_size : int
    progress : bool

    Returns
    -------
    dict of str to (Tensor of shape (N,), dict of str to Tensor of shape (N,))
        Per detector: its combined scores and, for patch detectors, each layer's raw scores
        (float64; empty dict otherwise); all on the CPU.
    """
    if not detectors:
        raise ValueError("detectors must hold at least one detector")
    model = next(iter(detectors.values())).model
    shared = {name: det for name, det in detectors.items() if _shares_scoring(det)}
    chunks: dict[str, list] = {name: [] for name in detectors}
    loader = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    if shared:
        for _, logits, feats, _ in _batches(list(shared.values()), model, loader, progress, "score"):
            for name, det in shared.items():
                own = {layer: feats[layer] for layer in det.layers}
                if isinstance(det, PatchMahalanobis):
                    layer_scores = det.layer_scores_features(logits, own)  # (n, L)
                    chunks[name].append((det.combine(layer_scores).cpu(), layer_scores.cpu()))
                else:
                    chunks[name].append((det.score_features(logits, own).cpu(), None))
    for name, det in detectors.items():
        if name not in shared:
            chunks[name] = [(det.score(batch).cpu(), None) for batch in loader]
    out = {}
    for name, det in detectors.items():
        combined = torch.cat([c for c, _ in chunks[name]])
        layers = {}
        if chunks[name][0][1] is not None:
            stacked = torch.cat([ls for _, ls in chunks[name]])  # (N, L)
            layers = {layer: stacked[:, i] for i, layer in enumerate(det.layers)}
        out[name] = (combined, layers)
    return out
