"""Fit several detectors of one model with one forward pass per batch.

Benchmarks compare many detectors on the same model; fitting each on its own would run the
network once per detector over the whole training set. :func:`fit_detectors` captures the union
of their layers once per batch and hands each detector its share. A Simple detector fitted next
to a Class detector with label weights on the same layers takes its moments from the Class
statistics (the one-hot groups pooled with Chan's merge: the moments of every patch), so those
patches are reduced once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from covguard.detectors.base import Detector, eval_mode, unpack_batch
from covguard.detectors.class_mahalanobis import ClassMahalanobis
from covguard.detectors.patch import PatchMahalanobis
from covguard.detectors.simple_mahalanobis import SimpleMahalanobis
from covguard.stats import Moments
from covguard.features import FeatureTap, model_device

__all__ = ["fit_detectors"]


def _shares_pass(det: Detector) -> bool:
    """Whether the detector's fit is one streaming pass (ViM, e.g., reads its loader twice)."""
    return det.single_pass


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
        Detectors sharing one model. Those needing no fit are skipped; those with their own
        multi-pass ``fit`` (ViM, Class with ``basis_rank``) are fitted on their own after the
        shared pass.
    loader : iterable of Tensor (N, C, H, W) or of tuples (x, y)
        In-distribution training images (and labels).
    holdout : iterable, optional
        Held-out in-distribution images that standardize the layers of multi-layer patch
        detectors (as :meth:`PatchMahalanobis.fit`); ``loader`` is used again when None.
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
    shared = [det for det in detectors if det.requires_fit and _shares_pass(det)]
    if shared:
        _shared_pass(shared, model, loader, progress)
        multi_layer = [det for det in shared if isinstance(det, PatchMahalanobis) and len(det.layers) > 1]
        single = [det for det in shared if isinstance(det, PatchMahalanobis) and len(det.layers) == 1]
        for det in single:
            det.score_mean_, det.score_std_ = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        if multi_layer:
            _standardize(multi_layer, model, holdout if holdout is not None else loader, progress)
    for det in detectors:
        if det.requires_fit and not _shares_pass(det):
            if isinstance(det, PatchMahalanobis):
                det.fit(loader, holdout=holdout, progress=progress)
            else:
                det.fit(loader, progress=progress)
    return detectors


def _layers(detectors: Sequence[Detector]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(layer for det in detectors for layer in det.layers))


def _batches(detectors: Sequence[Detector], model, loader: Iterable, progress: bool, desc: str):
    """Yield (x, logits, feats, y) with one forward over the union of the detectors' layers."""
    device = model_device(model)
    total = len(loader) if hasattr(loader, "__len__") else None
    with eval_mode(model), torch.no_grad(), FeatureTap(model, _layers(detectors)) as tap:
        for batch in tqdm(loader, desc=desc, total=total, disable=not progress, leave=False):
            x, y = unpack_batch(batch)
            if x.shape[0] == 0:
                continue
            x = detectors[0]._check_input(x)
            logits, feats = tap(x)
            yield x, logits, feats, None if y is None else y.to(device)


def _pooled_sources(detectors: Sequence[Detector]) -> dict[int, ClassMahalanobis]:
    """Simple detectors whose moments equal the pooled moments of a label-weighted Class
    detector of the same layers and patch geometry: {index of the Simple detector: that Class detector}."""
    sources = [
        det for det in detectors
        if isinstance(det, ClassMahalanobis) and det.class_weights == "label" and det.basis_rank is None
    ]
    out = {}
    for i, det in enumerate(detectors):
        if type(det) is not SimpleMahalanobis:
            continue
        for src in sources:
            if all(
                layer in src.layers and src.kernel_size[layer] == det.kernel_size[layer] and src.padding[layer] == det.padding[layer]
                for layer in det.layers
            ):
                out[i] = src
                break
    return out


def _shared_pass(detectors: Sequence[Detector], model, loader: Iterable, progress: bool) -> None:
    for det in detectors:
        det.input_shape_ = None
        det._fit_begin()
    pooled = _pooled_sources(detectors)
    shape = None
    for index, (x, logits, feats, y) in enumerate(_batches(detectors, model, loader, progress, f"fit {len(detectors)} detectors")):
        shape = shape or tuple(x.shape[1:])
        for name, f in feats.items():
            if not torch.isfinite(f).all():
                raise ValueError(f"activations of layer {name!r} in batch {index} contain NaN or inf")
        for i, det in enumerate(detectors):
            own = {layer: feats[layer] for layer in det.layers}
            if i in pooled:
                det._fit_prepare(logits, own)  # sizes only: the moments come from the Class statistics
            else:
                det._fit_batch(logits, own, y)
    if shape is None:
        raise ValueError("loader is empty: fit needs at least one batch of in-distribution images")
    for i, src in pooled.items():
        for layer, acc in detectors[i]._accumulators.items():
            m = src._accumulators[layer].moments  # (K groups)
            acc.moments = Moments(m.n, m.mean, m.scatter).pooled()
    for det in detectors:
        det._fit_end()
        det.input_shape_ = shape


def _standardize(detectors: Sequence[PatchMahalanobis], model, loader: Iterable, progress: bool) -> None:
    per_layer: list[list[torch.Tensor]] = [[] for _ in detectors]
    for _, logits, feats, _ in _batches(detectors, model, loader, progress, "standardize"):
        for out, det in zip(per_layer, detectors):
            out.append(det._layer_scores(logits, {layer: feats[layer] for layer in det.layers}).cpu())
    for out, det in zip(per_layer, detectors):
        det.set_standardization(torch.cat(out).double())


def _shares_scoring(det: Detector) -> bool:
    """Whether the detector scores from one plain forward (ODIN, e.g., perturbs its input first)."""
    return type(det).score is Detector.score


@torch.no_grad()
def score_detectors(
    detectors: dict[str, Detector], x: torch.Tensor, *, batch_size: int = 256, progress: bool = False
) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
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
        (empty dict otherwise); all on the CPU.
    """
    if not detectors:
        raise ValueError("detectors must hold at least one detector")
    dets = list(detectors.values())
    model = dets[0].model
    shared = {name: det for name, det in detectors.items() if _shares_scoring(det)}
    chunks: dict[str, list] = {name: [] for name in detectors}
    loader = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    if shared:
        for _, logits, feats, _ in _batches(list(shared.values()), model, loader, progress, "score"):
            for name, det in shared.items():
                own = {layer: feats[layer] for layer in det.layers}
                if isinstance(det, PatchMahalanobis):
                    layer_scores = det._layer_scores(logits, own)  # (n, n_layers)
                    chunks[name].append((det._combine(layer_scores).cpu(), layer_scores.cpu()))
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
            stacked = torch.cat([ls for _, ls in chunks[name]])  # (N, n_layers)
            layers = {layer: stacked[:, i] for i, layer in enumerate(det.layers)}
        out[name] = (combined, layers)
    return out
