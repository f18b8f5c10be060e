"""Shared machinery of the patch-Mahalanobis detectors (Simple and Class).

Per tapped layer: stream the moments of every ``k x k`` patch vector (``D = C k^2``), turn them
into a :class:`~covguard.covariance.QuadraticForm`, score every patch with a convolution,
aggregate the ``(N, H', W')`` map per image, and combine layers by summing scores standardized
(z-scores) on held-out in-distribution data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from covguard.covariance import CovarianceConfig, QuadraticForm, quadratic_form
from covguard.detectors.base import Detector, check_is_fitted, warn_nonfinite
from covguard.patches import patch_mahalanobis_sq, patch_vectors
from covguard.stats import Moments, StreamingMoments

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
    """

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
        self.forms_: dict[str, QuadraticForm] = {}
        self.channels_: dict[str, int] = {}
        self.score_mean_: Tensor | None = None
        self.score_std_: Tensor | None = None
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

    def fit(self, loader: Iterable, *, holdout: Iterable | None = None, progress: bool = True) -> PatchMahalanobis:
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

        Returns
        -------
        PatchMahalanobis
            ``self``.
        """
        super().fit(loader, progress=progress)
        if len(self.layers) == 1:
            self.score_mean_, self.score_std_ = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
            return self
        per_layer = torch.cat(
            [
                self._layer_scores(logits, feats).cpu()
                for _, logits, feats, _ in self._forward_loader(holdout if holdout is not None else loader, progress, "standardize")
            ]
        ).double()  # (N, n_layers)
        if per_layer.shape[0] < 2:
            raise ValueError(f"holdout must hold at least 2 images to standardize layer scores; got {per_layer.shape[0]}")
        self.score_mean_ = per_layer.mean(0)
        self.score_std_ = per_layer.std(0).clamp_min(1e-12)
        return self

    def _fit_begin(self) -> None:
        self._accumulators = {}
        self.forms_, self.channels_, self._cache = {}, {}, {}
        self.score_mean_ = self.score_std_ = None

    def _fit_batch(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> None:
        weights = self._weights(logits, y)  # (N, K) or None
        for layer, f in feats.items():
            self._check_map(layer, f)
            p = patch_vectors(f, kernel_size=self.kernel_size[layer], padding=self.padding[layer])  # (N, L, D)
            if layer not in self._accumulators:
                self.channels_[layer] = f.shape[1]
                self._accumulators[layer] = StreamingMoments(p.shape[-1], n_groups=self._n_groups(logits))
            w = None if weights is None else weights.repeat_interleave(p.shape[1], dim=0)  # (N L, K)
            self._accumulators[layer].update(p.reshape(-1, p.shape[-1]), w)  # (N L, D)

    def _fit_end(self) -> None:
        for layer, acc in self._accumulators.items():
            moments = self._finalize_moments(layer, acc.moments)
            self.forms_[layer] = quadratic_form(moments, self.config).to(device="cpu")
        self._accumulators = {}

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
        key = (dtype, device)
        if key not in self._cache:
            self._cache = {key: {layer: form.to(dtype, device) for layer, form in self.forms_.items()}}
        return self._cache[key]

    def _maps(self, logits: Tensor, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        forms = self._forms(logits.dtype, logits.device)
        maps = {}
        weights = self._group_weights(logits)  # (N, K) or None
        for layer, f in feats.items():
            self._check_map(layer, f)
            geometry = {"kernel_size": self.kernel_size[layer], "padding": self.padding[layer]}
            if weights is None:
                maps[layer] = patch_mahalanobis_sq(f, forms[layer], **geometry)[:, 0]  # (N, H', W')
                continue
            # Score each image only against the groups it weights: K times less work for top-1.
            out = None
            for k in (weights > 0).any(0).nonzero().flatten().tolist():
                rows = (weights[:, k] > 0).nonzero().flatten()
                d2 = patch_mahalanobis_sq(f[rows], forms[layer].group(k), **geometry)[:, 0]  # (n_k, H', W')
                if out is None:
                    out = torch.zeros(f.shape[0], *d2.shape[1:], dtype=d2.dtype, device=d2.device)
                out.index_add_(0, rows, d2 * weights[rows, k, None, None])
            maps[layer] = out
        return maps

    def _layer_scores(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Aggregated score of each layer, shape (N, n_layers); +inf where activations are not finite."""
        maps = self._maps(logits, feats)
        cols = []
        for layer, m in maps.items():
            s = m.flatten(1).mean(1) if self.aggregate == "mean" else m.flatten(1).amax(1)  # (N,)
            cols.append(s.masked_fill(~torch.isfinite(feats[layer]).flatten(1).all(1), float("inf")))
        return torch.stack(cols, dim=1)

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Combined score (N,): sum over layers of z-scored layer scores (raw score for one layer)."""
        check_is_fitted(self)
        return self._combine(self._layer_scores(logits, feats))

    def _combine(self, scores: Tensor) -> Tensor:
        """(N, n_layers) layer scores -> (N,) sum of z-scores; +inf (warned) where not finite."""
        mean, std = self.score_mean_.to(scores), self.score_std_.to(scores)
        combined = ((scores - mean) / std).sum(1) if len(self.layers) > 1 else scores[:, 0]
        return warn_nonfinite(combined, ~torch.isfinite(combined))

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
