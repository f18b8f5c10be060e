"""Class-conditional statistics in a reduced form: a shared basis, then per-class moments in it.

Exact per-class covariances of ``D``-dimensional patch vectors take ``K D^2`` float64 numbers:
100 classes at ResNet-18 ``layer4`` (``D = 4608``) need 17 GB. This module keeps instead, in
two streaming passes over the data,

- pass 1 (:meth:`SharedBasisClassMoments.update_pooled`): per class the weight ``n_k``, the
  exact mean ``mu_k`` (K, D) and the trace ``t_k`` of its scatter, and one pooled within-class
  scatter ``W = sum_k M2_k`` (D, D), all Chan-merged in float64;
- the basis (:meth:`~SharedBasisClassMoments.fit_basis`): ``U`` (D, r), the top ``r``
  eigenvectors of ``W``;
- pass 2 (:meth:`~SharedBasisClassMoments.update`): per class the moments of ``z = U^T x``
  (K, r, r), i.e. ``A_k = U^T S_k U`` exactly.

Each class covariance is then modelled as ``S_k ~ U A_k U^T + s2_k (I - U U^T)`` with the residual
variance ``s2_k = (t_k / n_k - tr A_k) / (D - r)``: exact inside the basis, isotropic outside,
the cross terms between the two dropped. Memory: ``D^2 + K (D + r^2)`` numbers instead of
``K D^2`` (100 classes, ``D = 4608``, ``r = 256``: 0.2 GB instead of 17 GB).
:func:`reduced_quadratic_form` turns the result into the probabilistic-PCA scoring form of
:mod:`covguard.covariance` (rank ``k <= r`` per class), which the convolution scorer serves as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from covguard.covariance import CovarianceConfig, QuadraticForm, _floor, _top_eigenpairs
from covguard.stats import Moments, StreamingMoments

__all__ = ["ReducedClassMoments", "SharedBasisClassMoments", "reduced_quadratic_form"]


@dataclass(frozen=True)
class ReducedClassMoments:
    """Per-class statistics in a shared basis (float64).

    Attributes
    ----------
    n : Tensor of shape (K,)
        Total weight of each class.
    mean : Tensor of shape (K, D)
        Exact class means.
    basis : Tensor of shape (D, r)
        Orthonormal shared basis ``U``.
    scatter : Tensor of shape (K, r, r)
        Scatter of ``U^T x`` about each class's mean: ``n_k U^T S_k U``.
    trace : Tensor of shape (K,)
        Trace of each class's full ``D``-dimensional scatter, ``n_k tr(S_k)``.
    """

    n: Tensor
    mean: Tensor
    basis: Tensor
    scatter: Tensor
    trace: Tensor

    def covariance_in_basis(self) -> Tensor:
        """``A_k = U^T S_k U``, shape (K, r, r)."""
        return self.scatter / self.n[:, None, None]

    def residual_variance(self) -> Tensor:
        """Mean variance outside the basis, ``(tr S_k - tr A_k) / (D - r)``, shape (K,)."""
        D, r = self.basis.shape
        inside = torch.diagonal(self.scatter, dim1=-2, dim2=-1).sum(-1)  # (K,)
        return (self.trace - inside) / self.n / max(D - r, 1)

    def empty_classes(self) -> list[int]:
        """Classes with total weight 0."""
        return (self.n <= 0).nonzero().flatten().tolist()

    def with_pooled(self, classes: list[int]) -> ReducedClassMoments:
        """A copy where ``classes`` take the pooled statistics of the others (mean of the union,
        within-class covariance), with the pooled weight."""
        keep = (self.n > 0) & ~torch.isin(torch.arange(len(self.n), device=self.n.device), torch.tensor(classes, device=self.n.device))
        total = self.n[keep].sum()
        if not total > 0:
            raise ValueError("no class has samples: cannot pool statistics")
        n, mean, scatter, trace = self.n.clone(), self.mean.clone(), self.scatter.clone(), self.trace.clone()
        n[classes] = total
        mean[classes] = (self.n[keep, None] * self.mean[keep]).sum(0) / total
        scatter[classes] = self.scatter[keep].sum(0)
        trace[classes] = self.trace[keep].sum()
        return ReducedClassMoments(n, mean, self.basis, scatter, trace)


class SharedBasisClassMoments:
    """Accumulate :class:`ReducedClassMoments` in two streaming passes.

    Parameters
    ----------
    dim : int
        Vector dimension ``D``.
    n_classes : int
        Number of classes ``K``.
    rank : int, default 256
        Dimension ``r`` of the shared basis (clipped to ``D``).
    reduce_dtype : torch.dtype, default torch.float32
        Dtype of the per-batch products, after centering; merges are float64.

    Examples
    --------
    >>> x, y = torch.randn(300, 8), torch.arange(300) % 3
    >>> w = torch.nn.functional.one_hot(y, 3).float()
    >>> acc = SharedBasisClassMoments(8, 3, rank=4)
    >>> _ = acc.update_pooled(x, w).fit_basis()
    >>> acc.update(x, w).result().scatter.shape
    torch.Size([3, 4, 4])
    """

    def __init__(self, dim: int, n_classes: int, *, rank: int = 256, reduce_dtype: torch.dtype = torch.float32) -> None:
        if dim < 1 or n_classes < 1 or rank < 1:
            raise ValueError(f"dim, n_classes and rank must be positive integers; got {dim}, {n_classes}, {rank}")
        self.dim, self.n_classes, self.rank = dim, n_classes, min(rank, dim)
        self.reduce_dtype = reduce_dtype
        self.n: Tensor | None = None  # (K,)
        self.mean: Tensor | None = None  # (K, D)
        self.trace: Tensor | None = None  # (K,)
        self.within: Tensor | None = None  # (D, D) pooled within-class scatter
        self.basis: Tensor | None = None  # (D, r)
        self._inside: StreamingMoments | None = None

    def _check(self, x: Tensor, weights: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (M, D) with D={self.dim}; got {tuple(x.shape)}")
        if weights.shape != (x.shape[0], self.n_classes):
            raise ValueError(f"weights must be (M, K) = ({x.shape[0]}, {self.n_classes}); got {tuple(weights.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf values; statistics would be corrupted")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and non-negative")

    def update_pooled(self, x: Tensor, weights: Tensor) -> SharedBasisClassMoments:
        """Pass 1: add a batch to the class means, traces and the pooled within-class scatter.

        Parameters
        ----------
        x : Tensor of shape (M, D)
        weights : Tensor of shape (M, K)
            Non-negative weight of each vector in each class (one-hot labels, probabilities).

        Returns
        -------
        SharedBasisClassMoments
            ``self``.
        """
        self._check(x, weights)
        if self.basis is not None:
            raise RuntimeError("the basis is already fitted: update_pooled belongs to the first pass")
        if x.shape[0] == 0:
            return self
        dt = self.reduce_dtype
        w = weights.to(dt)  # (M, K)
        nb = weights.double().sum(0)  # (K,)
        s = w.sum(1)  # (M,) total weight of each row
        center = (s @ x.to(dt)) / s.sum().clamp_min(1e-30)  # (D,) weighted batch mean: the shift
        xc = x.to(dt) - center  # (M, D)
        sums = (w.T @ xc).double()  # (K, D)
        safe = torch.where(nb > 0, nb, torch.ones_like(nb))
        mb = sums / safe[:, None]  # (K, D) class batch means, shifted
        # sum_k sum_m w_mk (x_m - m_bk)(x_m - m_bk)^T = sum_m s_m xc_m xc_m^T - sum_k n_bk mb_k mb_k^T
        within_b = ((xc * s[:, None]).T @ xc).double() - (mb * nb[:, None]).T @ mb  # (D, D)
        sq = (xc * xc).sum(1)  # (M,) squared norms
        trace_b = (w.T @ sq).double() - nb * (mb * mb).sum(1)  # (K,)
        mb = mb + center.double()  # (K, D) unshifted
        if self.n is None:
            self.n, self.mean, self.trace, self.within = nb, mb, trace_b, within_b
            return self
        n = self.n + nb
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = mb - self.mean  # (K, D)
        coef = self.n * nb / safe  # (K,)
        self.mean = self.mean + delta * (nb / safe)[:, None]
        self.trace = self.trace + trace_b + coef * (delta * delta).sum(1)
        self.within = self.within + within_b + (delta * coef[:, None]).T @ delta
        self.n = n
        return self

    def fit_basis(self) -> SharedBasisClassMoments:
        """The shared basis: top ``rank`` eigenvectors of the pooled within-class covariance."""
        if self.within is None:
            raise RuntimeError("no data: call update_pooled on the first pass before fit_basis")
        cov = (self.within + self.within.T) / 2 / self.n.sum()
        self.basis = _top_eigenpairs(cov[None], self.rank)[1][0]  # (D, r)
        self._inside = StreamingMoments(self.rank, n_groups=self.n_classes, reduce_dtype=self.reduce_dtype)
        return self

    def pooled_moments(self) -> Moments:
        """The exact moments of every class merged into one (K = 1), from the first pass.

        ``n = sum_k n_k``, ``mean = sum_k n_k mu_k / n`` and the total scatter: the pooled
        within-class scatter plus the scatter of the class means, ``W + sum_k n_k (mu_k - mean)(mu_k - mean)^T``.
        """
        if self.within is None:
            raise RuntimeError("no data: call update_pooled on the first pass before pooled_moments")
        n = self.n.sum()
        mean = (self.n[:, None] * self.mean).sum(0) / n  # (D,)
        between = (self.mean - mean) * self.n[:, None].sqrt()  # (K, D)
        scatter = (self.within + self.within.T) / 2 + between.T @ between  # (D, D)
        return Moments(n[None], mean[None], scatter[None])

    def update(self, x: Tensor, weights: Tensor) -> SharedBasisClassMoments:
        """Pass 2: add a batch to the per-class moments of ``U^T x``.

        Parameters
        ----------
        x : Tensor of shape (M, D)
        weights : Tensor of shape (M, K)
            The same weights as in the first pass.

        Returns
        -------
        SharedBasisClassMoments
            ``self``.
        """
        self._check(x, weights)
        if self._inside is None:
            raise RuntimeError("call fit_basis after the first pass (update_pooled) before update")
        if x.shape[0]:
            center = self.mean.mean(0)  # (D,) shift against float32 cancellation
            z = (x.to(self.reduce_dtype) - center.to(self.reduce_dtype)) @ self.basis.to(self.reduce_dtype)  # (M, r)
            self._inside.update(z, weights.to(self.reduce_dtype) if self.n_classes > 1 else None)
        return self

    def result(self) -> ReducedClassMoments:
        """The statistics of both passes (classes without weight keep ``n = 0``; see
        :meth:`ReducedClassMoments.with_pooled`)."""
        if self._inside is None or self._inside.moments is None:
            raise RuntimeError("no second-pass data: call update after fit_basis")
        return ReducedClassMoments(self.n, self.mean, self.basis, self._inside.moments.scatter, self.trace)


def reduced_quadratic_form(stats: ReducedClassMoments, config: CovarianceConfig) -> QuadraticForm:
    """The per-class probabilistic-PCA form of reduced statistics (float64).

    With ``A_k + tau_k I = V diag(l) V^T`` (ridge ``tau_k = eps tr(S_k) / D``), the top
    ``k = config.rank`` eigenpairs give ``proj = U V_k`` and the residual variance is the mean of
    every other eigenvalue of the modelled covariance, ``s2 = (tr S_k + D tau_k - sum(l_top)) / (D - k)``,
    exactly as :func:`covguard.covariance.quadratic_form` does with the full covariance.

    Parameters
    ----------
    stats : ReducedClassMoments
    config : CovarianceConfig
        ``form="lowrank"`` with ``shrinkage="ridge"``; ``rank`` is clipped to the basis rank.

    Returns
    -------
    QuadraticForm
        ``mean`` (K, D), ``proj`` (K, D, k), ``gain`` (K, k), ``diag`` (K, D).
    """
    if config.form != "lowrank" or config.shrinkage != "ridge":
        raise ValueError(f"reduced class statistics support covariance='lowrank' with shrinkage='ridge'; got {config.form!r}, {config.shrinkage!r}")
    if stats.empty_classes():
        raise ValueError(f"classes {stats.empty_classes()} have no samples (total weight 0); fill them with stats.with_pooled(...)")
    D, r = stats.basis.shape
    k = min(config.rank, r)
    trace = stats.trace / stats.n  # (K,) tr(S_k)
    tau = config.eps * trace / D  # (K,)
    inside = stats.covariance_in_basis() + tau[:, None, None] * torch.eye(r, dtype=torch.float64, device=trace.device)
    evals, evecs = torch.linalg.eigh(inside)  # ascending: (K, r), (K, r, r)
    top_vals, top_vecs = evals[:, r - k :], evecs[:, :, r - k :]  # (K, k), (K, r, k)
    scale = (trace + D * tau)[:, None, None] / D * torch.ones(1, 1, 1, dtype=torch.float64, device=trace.device)  # (K, 1, 1)
    top_vals = _floor(top_vals, scale)
    s2 = _floor((trace + D * tau - top_vals.sum(-1)) / max(D - k, 1), scale)  # (K,)
    proj = stats.basis @ top_vecs  # (K, D, k)
    gain = 1.0 / top_vals - 1.0 / s2[:, None]  # (K, k)
    return QuadraticForm(stats.mean, proj, gain, (1.0 / s2)[:, None].expand(-1, D).clone())
