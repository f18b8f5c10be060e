"""Moments in fewer than ``K D^2`` numbers: a tied within-class scatter (:class:`TiedMoments`, for
MDS-like baselines) and per-coordinate statistics (:class:`StreamingDiagonalMoments`, for diagonal
covariance forms). Both stream in float64 with Chan's merges, like :mod:`covguard.stats`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["StreamingDiagonalMoments", "TiedMoments"]


class TiedMoments:
    """Streaming class counts, class means and pooled within-class scatter, in float64.

    Memory ``O(K C + C^2)``, unlike per-class scatters (``K C^2``: 2 GB for 1000 classes of
    512-d features). Each batch is centered on its own class means and merged with Chan's
    formula, summed over classes: ``W = W_a + W_b + sum_k n_ak n_bk / n_k d_k d_k^T``,
    ``d_k = mean_bk - mean_ak``.

    Parameters
    ----------
    n_classes : int
        ``K``.
    dim : int
        ``C``.
    device : torch.device, optional
    """

    def __init__(self, n_classes: int, dim: int, device: torch.device | None = None) -> None:
        self.n = torch.zeros(n_classes, dtype=torch.float64, device=device)  # (K,)
        self.mean = torch.zeros(n_classes, dim, dtype=torch.float64, device=device)  # (K, C)
        self.within = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (C, C)

    def update(self, f: Tensor, y: Tensor) -> TiedMoments:
        """Add features (N, C) with labels (N,) in [0, K); returns ``self``."""
        f64 = f.double()
        onehot = F.one_hot(y, self.n.shape[0]).double()  # (N, K)
        n_b = onehot.sum(0)  # (K,)
        mean_b = (onehot.T @ f64) / n_b.clamp_min(1)[:, None]  # (K, C)
        dev = f64 - mean_b[y]  # (N, C)
        n = self.n + n_b
        delta = mean_b - self.mean  # (K, C)
        coef = self.n * n_b / n.clamp_min(1)  # (K,) 0 where a class is new or absent from the batch
        self.within += dev.T @ dev + (delta * coef[:, None]).T @ delta
        self.mean += delta * (n_b / n.clamp_min(1))[:, None]
        self.n = n
        return self

    def total(self) -> tuple[Tensor, Tensor]:
        """Mean (C,) and scatter (C, C) of all features, labels ignored (within + between)."""
        mean = (self.n @ self.mean) / self.n.sum()  # (C,)
        d = self.mean - mean  # (K, C)
        return mean, self.within + (d * self.n[:, None]).T @ d


class StreamingDiagonalMoments:
    """Streaming weights, means and per-coordinate centered sums of squares of ``K`` groups.

    What a diagonal covariance needs: ``2 K D`` numbers and ``O(M D K)`` work per batch of ``M``
    vectors (one product per statistic for all groups at once: no loop over groups), instead of
    the ``K D^2`` numbers and ``M D^2`` work of :class:`StreamingMoments`. Batches are centered on
    their own mean and reduced in float64, merged with Chan's formula per coordinate.

    Parameters
    ----------
    dim : int
        ``D``.
    n_groups : int
        ``K``.

    Attributes
    ----------
    n : Tensor of shape (K,) or None
    mean : Tensor of shape (K, D) or None
    m2 : Tensor of shape (K, D) or None
        ``sum_m w_mk (x_m - mean_k)^2``, float64.
    """

    def __init__(self, dim: int, n_groups: int = 1) -> None:
        self.dim, self.n_groups = dim, n_groups
        self.n: Tensor | None = None
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor, weights: Tensor | None = None) -> StreamingDiagonalMoments:
        """Add vectors (M, D) with group weights (M, K) (None: one group); returns ``self``."""
        if x.shape[0] == 0:
            return self
        # float64 products: they cost M K D, far below the M D^2 of a scatter, and the sums of
        # squares of near-constant coordinates would cancel in float32
        xd = x.double()
        center = xd.mean(0)  # (D,)
        xc = xd - center  # (M, D)
        w = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device) if weights is None else weights.double()
        nb = w.sum(0)  # (K,)
        s1 = w.T @ xc  # (K, D)
        s2 = w.T @ (xc * xc)  # (K, D)
        safe = torch.where(nb > 0, nb, torch.ones_like(nb))[:, None]
        mb = s1 / safe  # (K, D) batch means, centered
        m2b = (s2 - s1 * mb).clamp_min(0)  # (K, D)
        mb = mb + center
        if self.n is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return self
        n = self.n + nb
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = mb - self.mean  # (K, D)
        self.mean = self.mean + delta * (nb / safe)[:, None]
        self.m2 = self.m2 + m2b + delta * delta * (self.n * nb / safe)[:, None]
        self.n = n
        return self

    def all_reduce(self, *, device: torch.device | str | None = None) -> StreamingDiagonalMoments:
        """Replace these statistics by those of every process's data (as :func:`all_reduce_moments`)."""
        import torch.distributed as dist

        if self.n is None:
            self.n = torch.zeros(self.n_groups, dtype=torch.float64, device=device)
            self.mean = torch.zeros(self.n_groups, self.dim, dtype=torch.float64, device=device)
            self.m2 = torch.zeros_like(self.mean)
        n_local, mean_local = self.n, self.mean
        n = n_local.clone()
        dist.all_reduce(n)
        total = mean_local * n_local[:, None]  # (K, D)
        dist.all_reduce(total)
        mean = total / torch.where(n > 0, n, torch.ones_like(n))[:, None]
        m2 = self.m2 + n_local[:, None] * (mean_local - mean) ** 2
        dist.all_reduce(m2)
        self.n, self.mean, self.m2 = n, mean, m2
        return self
