"""Combine per-layer scores into one: z-scores from held-out in-distribution images, summed.

A single layer's score is used as it is (mean 0, std 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from covguard.stats import Moments, batch_moments, zero_moments

__all__ = ["LayerFusion", "check_layer_scores"]


def check_layer_scores(layer_scores: Tensor) -> None:
    """Raise ValueError naming the held-out images whose layer scores (N, L) are not finite."""
    bad = (~torch.isfinite(layer_scores).all(1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{len(bad)} holdout images (positions {bad[:10]}) have non-finite activations; "
            "standardizing layer scores needs finite in-distribution images"
        )


class LayerFusion:
    """Sum of per-layer z-scores.

    Parameters
    ----------
    n_layers : int
        ``L``, the number of layer scores combined.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.mean_: Tensor | None = None  # (L,) float64
        self.std_: Tensor | None = None  # (L,) float64
        if n_layers == 1:
            self.set(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))

    @property
    def is_fitted(self) -> bool:
        return self.mean_ is not None

    def set(self, mean: Tensor, std: Tensor) -> None:
        """Set the per-layer mean and standard deviation, each (L,)."""
        self.mean_, self.std_ = mean.double().cpu(), std.double().cpu()

    def fit(self, layer_scores: Tensor) -> None:
        """Standardize on held-out layer scores (N, L), N >= 2, finite."""
        if not isinstance(layer_scores, Tensor) or layer_scores.ndim != 2 or layer_scores.shape[1] != self.n_layers:
            got = tuple(layer_scores.shape) if isinstance(layer_scores, Tensor) else type(layer_scores).__name__
            raise ValueError(f"layer_scores must be (N, n_layers) with n_layers={self.n_layers}; got {got}")
        check_layer_scores(layer_scores)
        scores = layer_scores.double().cpu()
        self.fit_moments(batch_moments(scores) if len(scores) else zero_moments(self.n_layers))

    def fit_moments(self, moments: Moments) -> None:
        """Standardize from the moments of held-out layer scores (e.g. all-reduced across processes)."""
        n = int(moments.n[0].item())
        if n < 2:
            raise ValueError(f"holdout must hold at least 2 images to standardize layer scores; got {n}")
        var = torch.diagonal(moments.scatter[0]) / (n - 1)  # (L,) unbiased
        self.set(moments.mean[0], var.sqrt().clamp_min(1e-12))

    def combine(self, layer_scores: Tensor) -> Tensor:
        """(N, L) layer scores -> (N,) float64 sum of z-scores (the raw score for one layer)."""
        s64 = layer_scores.double()
        if self.n_layers == 1:
            return s64[:, 0]
        return ((s64 - self.mean_.to(s64.device)) / self.std_.to(s64.device)).sum(1)
