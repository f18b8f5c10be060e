"""Combine per-layer scores into one, fitted on the layer scores of held-out in-distribution images.

Every fusion first z-scores each layer's score ``s_l`` with its mean and standard deviation over
the held-out images, ``z_l = (s_l - mean_l) / std_l``, then (``fusion=``):

- ``"sum"``: ``sum_l z_l`` (the default; one layer: its raw score);
- ``"max"``: ``max_l z_l``, the most anomalous layer (one layer: its raw score);
- ``"gaussian"``: ``z^T (R + GAUSSIAN_RIDGE I)^-1 z`` with ``R`` the correlation matrix of the
  held-out layer scores: the squared Mahalanobis distance of the vector of layer scores to the
  Gaussian fitted to them (mean + full covariance, ridge relative to each layer's variance).
  Two-sided: images whose layer scores are atypically *low* (blank frames) score high too.

All three are fitted from the moments of the held-out layer scores (n, mean, scatter), so they
merge across processes exactly like the patch statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from covguard.stats import Moments, batch_moments, zero_moments

__all__ = ["FUSIONS", "GAUSSIAN_RIDGE", "LayerFusion", "check_layer_scores"]

FUSIONS = ("sum", "max", "gaussian")
#: Ridge added to the correlation matrix of the layer scores by ``fusion="gaussian"``:
#: ``Sigma + GAUSSIAN_RIDGE * diag(Sigma)`` in the units of the raw layer scores.
GAUSSIAN_RIDGE = 1e-3


def check_layer_scores(layer_scores: Tensor) -> None:
    """Raise ValueError naming the held-out images whose layer scores (N, L) are not finite."""
    bad = (~torch.isfinite(layer_scores).all(1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{len(bad)} holdout images (positions {bad[:10]}) have non-finite activations; "
            "standardizing layer scores needs finite in-distribution images"
        )


class LayerFusion:
    """Per-layer z-scores fused by a sum, a maximum or a Gaussian (see the module docstring).

    Parameters
    ----------
    n_layers : int
        ``L``, the number of layer scores combined.
    method : {"sum", "max", "gaussian"}
    """

    def __init__(self, n_layers: int, method: str = "sum") -> None:
        if method not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}; got {method!r}")
        self.n_layers, self.method = n_layers, method
        self.mean_: Tensor | None = None  # (L,) float64
        self.std_: Tensor | None = None  # (L,) float64
        self.correlation_: Tensor | None = None  # (L, L) float64, "gaussian" only
        self._cholesky: Tensor | None = None  # (L, L) lower factor of correlation_ + ridge I
        if not self.needs_holdout:
            self.set(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))

    @property
    def needs_holdout(self) -> bool:
        """Whether the fusion is fitted on held-out layer scores (several layers, or a Gaussian)."""
        return self.n_layers > 1 or self.method == "gaussian"

    @property
    def is_fitted(self) -> bool:
        return self.mean_ is not None and (self.method != "gaussian" or self.correlation_ is not None)

    def set(self, mean: Tensor, std: Tensor, correlation: Tensor | None = None) -> None:
        """Set the per-layer mean and standard deviation, each (L,), and for ``"gaussian"`` the
        correlation matrix (L, L) of the layer scores.

        Raises
        ------
        ValueError
            ``"gaussian"`` without a correlation matrix, or another fusion with one.
        """
        if (correlation is None) == (self.method == "gaussian"):
            need = "needs" if self.method == "gaussian" else "takes no"
            raise ValueError(f"fusion={self.method!r} {need} correlation matrix of the layer scores")
        self.mean_, self.std_ = mean.double().cpu(), std.double().cpu()
        if correlation is not None:
            corr = correlation.double().cpu()
            if corr.shape != (self.n_layers, self.n_layers):
                raise ValueError(f"correlation must be (L, L) with L={self.n_layers}; got {tuple(corr.shape)}")
            ridged = corr + GAUSSIAN_RIDGE * torch.eye(self.n_layers, dtype=torch.float64)  # (L, L)
            self.correlation_, self._cholesky = corr, torch.linalg.cholesky(ridged)

    def state(self) -> dict[str, Tensor]:
        """The fitted state: ``mean``, ``std`` (L,) and, for ``"gaussian"``, ``correlation`` (L, L)."""
        out = {"mean": self.mean_, "std": self.std_}
        if self.correlation_ is not None:
            out["correlation"] = self.correlation_
        return out

    def fit(self, layer_scores: Tensor) -> None:
        """Fit on held-out layer scores (N, L), N >= 2, finite."""
        if not isinstance(layer_scores, Tensor) or layer_scores.ndim != 2 or layer_scores.shape[1] != self.n_layers:
            got = tuple(layer_scores.shape) if isinstance(layer_scores, Tensor) else type(layer_scores).__name__
            raise ValueError(f"layer_scores must be (N, n_layers) with n_layers={self.n_layers}; got {got}")
        check_layer_scores(layer_scores)
        scores = layer_scores.double().cpu()
        self.fit_moments(batch_moments(scores) if len(scores) else zero_moments(self.n_layers))

    def fit_moments(self, moments: Moments) -> None:
        """Fit from the moments of held-out layer scores (e.g. all-reduced across processes)."""
        n = int(moments.n[0].item())
        if n < 2:
            raise ValueError(f"holdout must hold at least 2 images to standardize layer scores; got {n}")
        cov = moments.scatter[0].cpu() / (n - 1)  # (L, L) unbiased
        std = torch.diagonal(cov).sqrt().clamp_min(1e-12)  # (L,)
        correlation = None
        if self.method == "gaussian":
            correlation = cov / (std[:, None] * std[None, :])  # (L, L)
            correlation = (correlation + correlation.T) / 2  # exactly symmetric, as a saved file must be
        self.set(moments.mean[0], std, correlation)

    def combine(self, layer_scores: Tensor) -> Tensor:
        """(N, L) layer scores -> (N,) float64 fused score (the raw score for one layer, but for
        ``"gaussian"``)."""
        s64 = layer_scores if layer_scores.dtype == torch.float64 else layer_scores.double()
        if not self.needs_holdout:
            return s64[:, 0]
        mean, std = self.mean_, self.std_
        if mean.device != s64.device:
            mean, std = mean.to(s64.device), std.to(s64.device)
        z = (s64 - mean) / std  # (N, L)
        if self.method == "sum":
            return z.sum(1)
        if self.method == "max":
            return z.amax(1)
        white = torch.linalg.solve_triangular(self._cholesky.to(s64.device), z.T, upper=False)  # (L, N)
        return white.square().sum(0)  # (N,)
