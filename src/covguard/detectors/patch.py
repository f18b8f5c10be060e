"""Shared machinery of the patch-Mahalanobis detectors (Simple and Class).

Per tapped layer: stream the moments of every ``k x k`` patch vector (``D = C k^2``), turn them
into a :class:`~covguard.covariance.QuadraticForm`, score every patch with a convolution,
aggregate the ``(N, H', W')`` map per image, and combine layers by summing scores standardized
(z-scores) on held-out in-distribution data.

Numerics at scoring time: distances are computed in the model's dtype, except for a layer whose
precision form does not fit that dtype (e.g. activations near 1e30 give precisions near 1e-60,
which float32 flushes to zero): that layer is scored in float64. Images whose distances still
overflow are recomputed in float64. Scores are returned in the model's dtype and saturate at its
largest finite value, so finite activations always give a finite score; non-finite activations
give +inf with a warning.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from covguard.covariance import CovarianceConfig, QuadraticForm, quadratic_form
from covguard.detectors.base import Detector, check_is_fitted, parameter_sha256, sync_shards, use_distributed, warn_nonfinite
from covguard.features import model_device
from covguard.patches import output_size, patch_mahalanobis_sq, patch_vectors
from covguard.stats import Moments, StreamingMoments, all_reduce_moments, batch_moments, zero_moments

__all__ = ["PatchMahalanobis", "AGGREGATES"]

AGGREGATES = ("mean", "max")


def _per_layer(value: int | Mapping[str, int], layers: tuple[str, ...], name: str) -> dict[str, int]:
    """Expand an int or a {layer: int} mapping to every layer, validating it."""
    if isinstance(value, Mapping):
        missing = [layer for layer in layers if layer not in value]
        if missing:
            raise ValueError(f"{name} mapping must give a value for every layer; missing {missing}")
        out = {layer: int(value[layer]) for layer in layers}
    else:
        out = {layer: int(value) for layer in layers}
    low = 1 if name == "kernel_size" else 0
    bad = {layer: v for layer, v in out.items() if v < low}
    if bad:
        raise ValueError(f"{name} must be >= {low}; got {bad}")
    return out


class PatchMahalanobis(Detector):
    """Base of :class:`SimpleMahalanobis` and :class:`ClassMahalanobis`.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C, H, W) -> logits (N, K).
    layers : sequence of str
        Module names to tap; each must output a map (N, C, H, W).
    covariance : {"full", "diag", "lowrank"}
    rank : int
        Eigenpairs kept by ``lowrank``.
    shrinkage : {"ridge", "oas"}
    eps : float
        Relative ridge ``eps * tr(S)/D * I`` (with ``shrinkage="ridge"``).
    kernel_size : int or mapping of layer -> int
        Patch side ``k``; 1 scores single positions (e.g. pooled penultimate features).
    padding : int or mapping of layer -> int
        Zero padding of each map before patch extraction.
    aggregate : {"mean", "max"}
        How the per-patch map becomes one score per image and layer.
    keep_moments : bool
        Keep the fitted moments (``moments_``, float64: ``K D^2`` numbers per layer) so that
        :meth:`refit` derives other covariance forms without another pass over the data.

    Notes
    -----
    A group (the one group, or a class) whose fit patches have zero variance in every
    coordinate (constant features, one patch) has no Mahalanobis distance: it is an error for
    a single group; a class in that state uses the pooled covariance of all classes (warned).
    """

    supports_distributed: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Iterable[str],
        covariance: str = "full",
        rank: int = 64,
        shrinkage: str = "ridge",
        eps: float = 0.01,
        kernel_size: int | Mapping[str, int] = 3,
        padding: int | Mapping[str, int] = 0,
        aggregate: str = "mean",
        keep_moments: bool = False,
    ) -> None:
        super().__init__(model, layers=layers)
        if not self.layers:
            raise ValueError("layers must name at least one module")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}; got {aggregate!r}")
        self.config = CovarianceConfig(form=covariance, shrinkage=shrinkage, eps=eps, rank=rank)
        self.kernel_size = _per_layer(kernel_size, self.layers, "kernel_size")
        self.padding = _per_layer(padding, self.layers, "padding")
        self.aggregate = aggregate
        self.keep_moments = keep_moments
        self.moments_: dict[str, Moments] = {}
        self.forms_: dict[str, QuadraticForm] = {}
        self.channels_: dict[str, int] = {}
        self.score_mean_: Tensor | None = None
        self.score_std_: Tensor | None = None
        self.model_sha256_: str | None = None
        self._accumulators: dict[str, StreamingMoments] = {}
        self._cache: dict[tuple, dict[str, QuadraticForm]] = {}

    # ---- hooks for the class-conditional subclass --------------------------------------------

    def _n_groups(self, logits: Tensor) -> int:
        """Number of moment groups (1 for a shared mean and covariance)."""
        return 1

    def _weights(self, logits: Tensor, y: Tensor | None) -> Tensor | None:
        """Per-image group weights (N, K), or None for one group."""
        return None

    def _group_weights(self, logits: Tensor) -> Tensor | None:
        """Weight of each group in each image's distance map, (N, K), mostly zeros; None for one group."""
        return None

    def _finalize_moments(self, layer: str, moments: Moments) -> Moments:
        """Hook to repair groups before estimation (e.g. empty classes)."""
        return moments

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON-serializable), for persistence."""
        return {
            "layers": list(self.layers),
            "covariance": self.config.form,
            "rank": self.config.rank,
            "shrinkage": self.config.shrinkage,
            "eps": self.config.eps,
            "kernel_size": self.kernel_size,
            "padding": self.padding,
            "aggregate": self.aggregate,
        }

    # ---- fitting ------------------------------------------------------------------------------

    def fit(
        self, loader: Iterable, *, holdout: Iterable | None = None, progress: bool = True, distributed: bool | None = None
    ) -> PatchMahalanobis:
        """Fit the per-layer statistics in one streaming pass, then standardize layer scores.

        Parameters
        ----------
        loader : iterable of Tensor (N, C, H, W) or of tuples (x, y)
            In-distribution training images.
        holdout : iterable, optional
            Held-out in-distribution images used to standardize each layer's score before the
            layers are summed. With several layers and no ``holdout``, ``loader`` is scored a
            second time for this (distances of training images are slightly optimistic).
        progress : bool
            Show progress bars.
        distributed : bool, optional
            Each process passes its own shard of ``loader`` (and ``holdout``); the moments and
            the layer standardization are all-reduced, so every rank ends with the detector of
            all the data. Default: when ``torch.distributed`` is initialized. See
            :meth:`Detector.fit`.

        Returns
        -------
        PatchMahalanobis
            ``self``.
        """
        super().fit(loader, progress=progress, distributed=distributed)
        if len(self.layers) == 1:
            self.score_mean_, self.score_std_ = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
            return self
        distributed = use_distributed(distributed)
        per_layer, error = torch.zeros(0, len(self.layers), dtype=torch.float64), None
        try:
            batches = self._forward_loader(holdout if holdout is not None else loader, progress, "standardize")
            rows = [self._layer_scores(logits, feats).cpu() for _, logits, feats, _ in batches]
            if rows:
                per_layer = torch.cat(rows).double()  # (N, n_layers)
            self._check_layer_scores(per_layer)
        except Exception as err:
            if not distributed:
                raise
            error = err
        if not distributed:
            self.set_standardization(per_layer)
            return self
        device = model_device(self.model)
        sync_shards(error, None, device)
        local = batch_moments(per_layer.to(device)) if len(per_layer) else zero_moments(len(self.layers), device=device)
        self._standardize_from(all_reduce_moments(local))
        return self

    def set_standardization(self, layer_scores: Tensor) -> None:
        """Standardize each layer's score with its mean and std over held-out in-distribution images.

        Parameters
        ----------
        layer_scores : Tensor of shape (N, n_layers)
            Unstandardized layer scores (as :meth:`score_layers` returns them, stacked in the
            order of ``layers``) of N >= 2 held-out in-distribution images.
        """
        if not isinstance(layer_scores, Tensor) or layer_scores.ndim != 2 or layer_scores.shape[1] != len(self.layers):
            got = tuple(layer_scores.shape) if isinstance(layer_scores, Tensor) else type(layer_scores).__name__
            raise ValueError(f"layer_scores must be (N, n_layers) with n_layers={len(self.layers)}; got {got}")
        self._check_layer_scores(layer_scores)
        scores = layer_scores.double().cpu()
        self._standardize_from(batch_moments(scores) if len(scores) else zero_moments(len(self.layers)))

    @staticmethod
    def _check_layer_scores(layer_scores: Tensor) -> None:
        bad = (~torch.isfinite(layer_scores).all(1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{len(bad)} holdout images (positions {bad[:10]}) have non-finite activations; "
                "standardizing layer scores needs finite in-distribution images"
            )

    def _standardize_from(self, moments: Moments) -> None:
        """Set ``score_mean_`` and ``score_std_`` (unbiased) from the moments of the layer scores."""
        n = int(moments.n[0].item())
        if n < 2:
            raise ValueError(f"holdout must hold at least 2 images to standardize layer scores; got {n}")
        var = torch.diagonal(moments.scatter[0]) / (n - 1)  # (n_layers,)
        self.score_mean_ = moments.mean[0].cpu()
        self.score_std_ = var.sqrt().clamp_min(1e-12).cpu()

    def _fit_begin(self) -> None:
        self._accumulators, self.moments_ = {}, {}
        self.forms_, self.channels_, self._cache = {}, {}, {}
        self.score_mean_ = self.score_std_ = None
        self.model_sha256_ = None

    def _fit_prepare(self, logits: Tensor, feats: dict[str, Tensor]) -> None:
        for layer, f in feats.items():
            self._check_map(layer, f)
            if layer not in self._accumulators:
                self.channels_[layer] = f.shape[1]
                D = f.shape[1] * self.kernel_size[layer] ** 2
                # Batches reduced in float32 after centering, merged in float64 (DESIGN.md, Fit):
                # twice the speed of a float64 reduction, ~1e-6 relative error per batch.
                self._accumulators[layer] = StreamingMoments(D, n_groups=self._n_groups(logits), reduce_dtype=torch.float32)

    def _fit_batch(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> None:
        self._fit_prepare(logits, feats)
        for layer, (p, w) in self._patches(logits, feats, y).items():
            # fit checked every feature map: the patches of a finite map are finite.
            self._accumulators[layer].update(p, w, check_finite=False)

    def _patches(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Per layer: patch vectors (N L, D) and their group weights (N L, K), or None for one group."""
        weights = self._weights(logits, y)  # (N, K) or None
        out = {}
        for layer, f in feats.items():
            p = patch_vectors(f, kernel_size=self.kernel_size[layer], padding=self.padding[layer])  # (N, L, D)
            w = None if weights is None else weights.repeat_interleave(p.shape[1], dim=0)  # (N L, K)
            out[layer] = p.reshape(-1, p.shape[-1]), w
        return out

    def _fit_reduce(self) -> None:
        device = model_device(self.model)
        for acc in self._accumulators.values():
            acc.all_reduce(device=device)

    def _fit_end(self) -> None:
        moments = {
            layer: self._repair_degenerate(layer, self._finalize_moments(layer, acc.moments))
            for layer, acc in self._accumulators.items()
        }
        self._estimate_forms(moments)
        self.moments_ = {k: Moments(m.n.cpu(), m.mean.cpu(), m.scatter.cpu()) for k, m in moments.items()} if self.keep_moments else {}
        self._accumulators = {}
        self.model_sha256_ = parameter_sha256(self.model)

    def _estimate_forms(self, moments: Mapping[str, Moments]) -> None:
        self._cache = {}
        for layer, m in moments.items():
            self._set_form(layer, quadratic_form(m, self.config))

    def _set_form(self, layer: str, form: QuadraticForm) -> None:
        """Store a layer's form on the CPU, contiguous as a loaded file gives it: the same memory
        layout gives bit-identical scores."""
        fields = (form.mean, form.proj, form.gain, form.diag)
        self.forms_[layer] = QuadraticForm(*(None if t is None else t.cpu().contiguous() for t in fields))

    def refit(
        self,
        *,
        holdout: Iterable | None,
        covariance: str | None = None,
        rank: int | None = None,
        shrinkage: str | None = None,
        eps: float | None = None,
        aggregate: str | None = None,
        progress: bool = False,
    ) -> PatchMahalanobis:
        """A copy with another covariance estimate or aggregation, from the kept moments (no refit pass).

        Parameters
        ----------
        holdout : iterable or None
            Held-out in-distribution images that standardize the copy's layer scores (as in
            :meth:`fit`); may be None for a single layer.
        covariance, rank, shrinkage, eps, aggregate : optional
            What changes; the rest is copied.
        progress : bool
            Progress bar of the standardization pass.

        Returns
        -------
        PatchMahalanobis
            A fitted detector of the same class, sharing the model and the moments.
        """
        check_is_fitted(self)
        if not self.moments_:
            raise ValueError("refit needs the fitted moments: construct the detector with keep_moments=True")
        if holdout is None and len(self.layers) > 1:
            raise ValueError("holdout must hold in-distribution images to standardize the layer scores of several layers")
        other = copy.copy(self)
        other.config = CovarianceConfig(
            form=covariance or self.config.form,
            shrinkage=shrinkage or self.config.shrinkage,
            eps=self.config.eps if eps is None else eps,
            rank=self.config.rank if rank is None else rank,
        )
        other.aggregate = aggregate or self.aggregate
        if other.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}; got {other.aggregate!r}")
        other.forms_ = {}
        other._estimate_forms(self.moments_)
        if len(self.layers) > 1:
            other.standardize(holdout, progress=progress)
        return other

    def standardize(self, holdout: Iterable, *, progress: bool = False) -> None:
        """Re-standardize the layer scores on held-out in-distribution images (one scoring pass).

        For a fitted detector whose scoring changed after :meth:`fit` (e.g. another class
        ``scoring``); :meth:`set_standardization` takes precomputed layer scores instead.
        """
        rows = [self._layer_scores(logits, feats).cpu() for _, logits, feats, _ in self._forward_loader(holdout, progress, "standardize")]
        self.set_standardization(torch.cat(rows) if rows else torch.zeros(0, len(self.layers)))

    @torch.no_grad()
    def log_likelihood(self, x: Tensor) -> Tensor:
        """Mean Gaussian log-density of the patches of each image under the fitted model, per dimension.

        ``-(mean_patches d2 + D log 2 pi - logdet P) / (2 D)`` for each layer, with the precision
        ``P`` of the group each patch is scored against (weighted like the distances for
        class detectors). Averaged over held-out in-distribution images, it compares covariance
        estimates of the same statistics without any out-of-distribution data.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)

        Returns
        -------
        Tensor of shape (N, n_layers), float64
        """
        check_is_fitted(self)
        logits, feats = self.forward(x)
        maps = self._maps(logits, feats)
        weights = self._group_weights(logits)  # (N, K) or None
        cols = []
        for layer in self.layers:
            form = self.forms_[layer]
            D = form.mean.shape[1]
            logdet = form.logdet().to(logits.device)  # (K,)
            logdet = logdet[0] if weights is None else weights.double() @ logdet  # () or (N,)
            d2 = maps[layer].double().flatten(1).mean(1)  # (N,)
            cols.append(-(d2 + D * math.log(2 * math.pi) - logdet) / (2 * D))
        return torch.stack(cols, dim=1).cpu()

    def _repair_degenerate(self, layer: str, moments: Moments) -> Moments:
        """Give groups with zero variance in every coordinate the pooled covariance (or raise if all are)."""
        trace = torch.diagonal(moments.scatter, dim1=-2, dim2=-1).sum(-1)  # (K,)
        flat = (trace <= 0).nonzero().flatten()
        if len(flat) == 0:
            return moments
        if len(flat) == moments.n_groups:
            raise ValueError(
                f"the fit patches of layer {layer!r} have zero variance in every coordinate (constant activations, "
                "or a single patch); a Mahalanobis distance is undefined: fit on more varied images or tap another layer"
            )
        warnings.warn(
            f"groups {flat.tolist()} have zero variance at layer {layer!r} (constant activations or a single patch); "
            "they use the pooled covariance of all groups",
            RuntimeWarning,
            stacklevel=5,
        )
        keep = (trace > 0).nonzero().flatten()
        pooled = Moments(moments.n[keep], moments.mean[keep], moments.scatter[keep]).pooled()
        scatter = moments.scatter.clone()
        scatter[flat] = moments.n[flat, None, None] * (pooled.scatter / pooled.n[:, None, None])  # (k, D, D)
        return Moments(moments.n, moments.mean, scatter)

    # ---- scoring -----------------------------------------------------------------------------

    def _check_map(self, layer: str, f: Tensor) -> None:
        if f.ndim != 4:
            raise ValueError(f"layer {layer!r} must output a map (N, C, H, W); got shape {tuple(f.shape)}")
        k, pad = self.kernel_size[layer], self.padding[layer]
        if min(f.shape[-2:]) + 2 * pad < k:
            raise ValueError(
                f"layer {layer!r} outputs a {f.shape[-2]}x{f.shape[-1]} map, too small for kernel_size={k} "
                f"with padding={pad}; use a smaller kernel_size for it or a larger input"
            )
        if self.channels_.get(layer, f.shape[1]) != f.shape[1]:
            raise ValueError(f"layer {layer!r} must have C={self.channels_[layer]} channels (as at fit); got {f.shape[1]}")

    def _forms(self, dtype: torch.dtype, device: torch.device) -> dict[str, QuadraticForm]:
        """Each layer's form in ``dtype`` on ``device``, or in float64 where ``dtype`` cannot hold it."""
        key = (dtype, device)
        if key not in self._cache:
            self._cache = {
                key: {
                    layer: form.to(dtype if _fits(form, dtype) else torch.float64, device)
                    for layer, form in self.forms_.items()
                }
            }
        return self._cache[key]

    def _layer_map(self, layer: str, f: Tensor, form: QuadraticForm, weights: Tensor | None) -> Tensor:
        """Squared distances (N, H', W') of one layer's patches, in the dtype of ``form``."""
        f = f.to(form.mean.dtype)
        geometry = {"kernel_size": self.kernel_size[layer], "padding": self.padding[layer]}
        if weights is None:
            return patch_mahalanobis_sq(f, form, **geometry)[:, 0]  # (N, H', W')
        weights = weights.to(form.mean.dtype)
        size = [output_size(n, geometry["kernel_size"], geometry["padding"]) for n in f.shape[-2:]]
        out = torch.zeros(f.shape[0], *size, dtype=f.dtype, device=f.device)  # (N, H', W')
        # Score each image only against the groups it weights: K times less work for top-1.
        for k in (weights > 0).any(0).nonzero().flatten().tolist():
            rows = (weights[:, k] > 0).nonzero().flatten()
            d2 = patch_mahalanobis_sq(f[rows], form.group(k), **geometry)[:, 0]  # (n_k, H', W')
            out.index_add_(0, rows, d2 * weights[rows, k, None, None])
        return out

    def _maps(self, logits: Tensor, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._checked_maps(logits, feats)[0]

    def _checked_maps(self, logits: Tensor, feats: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
        """Distance maps {layer: (N, H', W')} in the features' dtype, and per layer which images have
        finite activations ((N,) bool), or None when every distance is finite.

        Every activation lies in some patch and reaches its distance with a nonzero weight, so a
        non-finite activation always gives a non-finite distance: the (C times larger) feature map
        is inspected only for images whose distances are not all finite.
        """
        forms = self._forms(logits.dtype, logits.device)
        maps, finite = {}, {}
        weights = self._group_weights(logits)  # (N, K) or None
        for layer, f in feats.items():
            self._check_map(layer, f)
            m = self._layer_map(layer, f, forms[layer], weights)  # (N, H', W')
            bad = ~torch.isfinite(m).flatten(1).all(1)  # (N,)
            if not bool(bad.any()):
                same = m.dtype == f.dtype  # else a float64 layer: saturate into the features' dtype
                maps[layer] = m if same else _saturate(m, torch.ones_like(bad), f.dtype)
                finite[layer] = None
                continue
            ok = torch.isfinite(f).flatten(1).all(1)  # (N,)
            redo = (ok & bad).nonzero().flatten()
            if len(redo) and m.dtype != torch.float64:  # overflow in the model's dtype: recompute in float64
                form64 = self.forms_[layer].to(torch.float64, f.device)
                w64 = None if weights is None else weights[redo]
                m = m.double().index_copy(0, redo, self._layer_map(layer, f[redo], form64, w64))
            maps[layer], finite[layer] = _saturate(m, ok, f.dtype), ok
        return maps, finite

    def _layer_scores(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Aggregated score of each layer, shape (N, n_layers); +inf where activations are not finite."""
        maps, finite = self._checked_maps(logits, feats)
        cols = []
        for layer, m in maps.items():
            flat = m.flatten(1)  # (N, H' W')
            # Mean in float64, so that maps saturated at the dtype's largest value do not overflow.
            s = flat.mean(1, dtype=torch.float64) if self.aggregate == "mean" else flat.amax(1).double()  # (N,)
            ok = finite[layer]
            if ok is None:
                cols.append(s.to(m.dtype))
            else:
                cols.append(_saturate(s, ok, m.dtype).masked_fill(~ok, float("inf")))
        return torch.stack(cols, dim=1)

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Combined score (N,): sum over layers of z-scored layer scores (raw score for one layer)."""
        check_is_fitted(self)
        return self._combine(self._layer_scores(logits, feats))

    def _combine(self, scores: Tensor) -> Tensor:
        """(N, n_layers) layer scores -> (N,) sum of z-scores; +inf (warned) where a layer score is not finite."""
        bad = ~torch.isfinite(scores).all(1)  # (N,): non-finite activations
        s64 = scores.double()
        mean, std = self.score_mean_.to(s64), self.score_std_.to(s64)
        combined = ((s64 - mean) / std).sum(1) if len(self.layers) > 1 else s64[:, 0]
        big = torch.finfo(scores.dtype).max
        return warn_nonfinite(combined.clamp(-big, big).to(scores.dtype), bad)

    def combine_layer_scores(self, layer_scores: Mapping[str, Tensor]) -> Tensor:
        """The combined score (N,) from the output of :meth:`score_layers`, without a second forward."""
        check_is_fitted(self)
        return self._combine(torch.stack([layer_scores[layer] for layer in self.layers], dim=1))

    @torch.no_grad()
    def score_layers(self, x: Tensor) -> dict[str, Tensor]:
        """Unstandardized score of each layer: {layer: (N,)}."""
        logits, feats = self.forward(x)
        scores = self._layer_scores(logits, feats)
        return {layer: scores[:, i] for i, layer in enumerate(self.layers)}

    @torch.no_grad()
    def score_map(self, x: Tensor) -> dict[str, Tensor]:
        """Squared distance of every patch: {layer: (N, H', W')}."""
        return self._maps(*self.forward(x))

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to a safetensors file; reload it with :func:`covguard.load`."""
        from covguard.persistence import save

        return save(self, path)

    @property
    def is_fitted(self) -> bool:
        return bool(self.forms_) and self.score_mean_ is not None


def _fits(form: QuadraticForm, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` can score with ``form``: its mean and its largest weights within ``sqrt`` of the range.

    The distances are sums of squared deviations times weights (``gain``, ``diag``): with the
    mean below ``sqrt(max)`` and the largest weight within ``[sqrt(tiny), sqrt(max)]`` they stay
    normal numbers. Otherwise (activations near 1e30 give weights near 1e-60, which float32
    flushes to zero) the layer is scored in float64. Projections are orthonormal: not checked.
    """
    info = torch.finfo(dtype)
    low, high = info.tiny**0.5, info.max**0.5
    if form.mean.abs().max() > high:
        return False
    for weights in (form.gain, form.diag):
        if weights is not None:
            largest = weights.abs().max()
            if largest > high or 0 < largest < low:
                return False
    return True


def _saturate(values: Tensor, finite: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast (N, ...) values to ``dtype``: rows with finite activations saturate at its largest finite
    value (NaN included), the other rows keep +inf where they are not finite."""
    big = torch.finfo(dtype).max
    rows = finite.reshape(-1, *([1] * (values.ndim - 1)))
    values = torch.nan_to_num(values, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    return torch.where(rows, values.clamp(-big, big), values).to(dtype)
