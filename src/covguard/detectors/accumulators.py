"""Accumulators of the statistics of one layer's patch vectors, pluggable into a patch detector.

- :class:`ExactAccumulator`: the exact weighted moments of every group (``K D^2`` numbers), one pass;
- :class:`DiagonalAccumulator`: per-coordinate statistics only (``2 K D``), what a diagonal
  covariance with ridge shrinkage needs, one pass;
- :class:`SharedBasisAccumulator`: the reduced class statistics of :mod:`covguard.class_stats`
  (a shared basis, then each class inside it), two passes.

Each takes ``update(pass_index, patches, weights)`` per batch and ``end_pass(index)`` between
passes, reports each group's total weight (``counts``) and gives the fitted form (``form``), in
which empty groups and groups without variance take the pooled statistics.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from covguard.class_stats import SharedBasisClassMoments, reduced_quadratic_form
from covguard.covariance import CovarianceConfig, QuadraticForm, diagonal_form, quadratic_form
from covguard.compact_stats import StreamingDiagonalMoments
from covguard.stats import Moments, StreamingMoments

__all__ = [
    "DiagonalAccumulator",
    "ExactAccumulator",
    "SharedBasisAccumulator",
    "draw_positions",
    "fill_groups",
    "repair_degenerate",
]


def fill_groups(moments: Moments, groups: list[int]) -> Moments:
    """Give ``groups`` (of zero weight) the pooled moments of all groups."""
    if not groups:
        return moments
    pooled = moments.pooled()
    n, mean, scatter = moments.n.clone(), moments.mean.clone(), moments.scatter.clone()
    n[groups], mean[groups], scatter[groups] = pooled.n, pooled.mean, pooled.scatter
    return Moments(n, mean, scatter)


def repair_degenerate(layer: str, moments: Moments) -> Moments:
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
        stacklevel=6,
    )
    keep = (trace > 0).nonzero().flatten()
    pooled = Moments(moments.n[keep], moments.mean[keep], moments.scatter[keep]).pooled()
    scatter = moments.scatter.clone()
    scatter[flat] = moments.n[flat, None, None] * (pooled.scatter / pooled.n[:, None, None])  # (k, D, D)
    return Moments(moments.n, moments.mean, scatter)


def draw_positions(n_images: int, n_positions: int, fraction: float, generator: torch.Generator) -> Tensor | None:
    """Rows of a seeded random share of each image's patch positions.

    Parameters
    ----------
    n_images : int
        ``N``.
    n_positions : int
        ``L``, patch positions per image.
    fraction : float
        Share of the positions kept per image, in (0, 1]: ``m = max(1, round(fraction L))``.
    generator : torch.Generator
        CPU generator of the draws.

    Returns
    -------
    Tensor of shape (N m,) or None
        Rows ``n L + l`` of the kept patches, image by image; None keeps every position.
    """
    if fraction >= 1:
        return None
    m = max(1, round(fraction * n_positions))
    keep = torch.rand(n_images, n_positions, generator=generator).argsort(1)[:, :m]  # (N, m) positions per image
    return (keep + n_positions * torch.arange(n_images)[:, None]).flatten()  # (N m,)


class ExactAccumulator:
    """Exact weighted moments of ``K`` groups of patch vectors, in one pass (``K D^2`` numbers).

    Batches are reduced in float32 after centering and merged in float64 (DESIGN.md, Fit):
    twice the speed of a float64 reduction, about 1e-6 relative error per batch.
    """

    passes = 1

    def __init__(self, dim: int, n_groups: int) -> None:
        self._acc = StreamingMoments(dim, n_groups=n_groups, reduce_dtype=torch.float32)

    @classmethod
    def from_moments(cls, moments: Moments) -> ExactAccumulator:
        """An accumulator holding given moments (float64)."""
        acc = cls(moments.dim, moments.n_groups)
        acc._acc.moments = moments
        return acc

    def update(self, pass_index: int, p: Tensor, w: Tensor | None) -> None:
        """Add patches (M, D) with group weights (M, K) or None (one group)."""
        # the detector checked every feature map: the patches of a finite map are finite
        self._acc.update(p, w, check_finite=False)

    def end_pass(self, pass_index: int) -> None:
        """Nothing to do between passes: there is one."""

    def all_reduce(self, device: torch.device) -> None:
        """Sum the moments of every process of the group."""
        self._acc.all_reduce(device=device)

    @property
    def moments(self) -> Moments:
        """The accumulated moments (float64), K groups."""
        return self._acc.moments

    def counts(self) -> Tensor:
        """Total weight of each group, shape (K,)."""
        return self._acc.moments.n

    def form(self, layer: str, config: CovarianceConfig, empty: list[int]) -> QuadraticForm:
        """The fitted form; ``empty`` groups take the pooled statistics."""
        return quadratic_form(repair_degenerate(layer, fill_groups(self._acc.moments, empty)), config)

    def pooled_moments(self) -> Moments:
        """The moments of every group merged into one (K = 1): the shared statistics."""
        return self._acc.moments.pooled()


class DiagonalAccumulator:
    """Per-coordinate statistics of ``K`` groups (:class:`~covguard.compact_stats.StreamingDiagonalMoments`):
    what a diagonal covariance with ridge shrinkage needs, ``D`` instead of ``D^2`` per patch."""

    passes = 1

    def __init__(self, dim: int, n_groups: int) -> None:
        self._acc = StreamingDiagonalMoments(dim, n_groups)

    def update(self, pass_index: int, p: Tensor, w: Tensor | None) -> None:
        self._acc.update(p, w)

    def end_pass(self, pass_index: int) -> None:
        """Nothing to do between passes: there is one."""

    def all_reduce(self, device: torch.device) -> None:
        self._acc.all_reduce(device=device)

    def counts(self) -> Tensor:
        return self._acc.n

    def form(self, layer: str, config: CovarianceConfig, empty: list[int]) -> QuadraticForm:
        """The diagonal form; ``empty`` groups, and groups with zero variance in every coordinate
        (as :func:`repair_degenerate`), take the pooled statistics."""
        n, mean, m2 = self._acc.n.clone(), self._acc.mean.clone(), self._acc.m2.clone()

        def pooled(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            total = n[rows].sum()
            centre = (n[rows, None] * mean[rows]).sum(0) / total  # (D,)
            return total, centre, (m2[rows] + n[rows, None] * (mean[rows] - centre) ** 2).sum(0)

        if empty:
            n[empty], mean[empty], m2[empty] = pooled((n > 0).nonzero().flatten())
        flat = (m2.sum(-1) <= 0).nonzero().flatten()
        if len(flat) == len(n):
            repair_degenerate(layer, Moments(n, mean, torch.zeros(len(n), 1, 1, dtype=m2.dtype)))  # raises
        if len(flat):
            warnings.warn(
                f"groups {flat.tolist()} have zero variance at layer {layer!r} (constant activations or a single patch); "
                "they use the pooled covariance of all groups",
                RuntimeWarning,
                stacklevel=6,
            )
            total, _, sq = pooled((m2.sum(-1) > 0).nonzero().flatten())
            m2[flat] = n[flat, None] * sq / total
        return diagonal_form(n, mean, m2, config)


class SharedBasisAccumulator:
    """Reduced class statistics (:class:`~covguard.class_stats.SharedBasisClassMoments`) in two passes.

    Pass 0 accumulates the class means and the pooled within-class scatter, whose top ``rank``
    eigenvectors become the shared basis at the end of the pass; pass 1 the class moments inside it.
    """

    passes = 2

    def __init__(self, dim: int, n_groups: int, rank: int) -> None:
        self._acc = SharedBasisClassMoments(dim, n_groups, rank=rank)

    def update(self, pass_index: int, p: Tensor, w: Tensor) -> None:
        if pass_index == 0:
            self._acc.update_pooled(p, w)
        else:
            self._acc.update(p, w)

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            self._acc.fit_basis()

    def all_reduce(self, device: torch.device) -> None:
        raise ValueError("basis_rank statistics cannot fit distributed; fit on one process (distributed=False)")

    def counts(self) -> Tensor:
        return self._acc.result().n

    def form(self, layer: str, config: CovarianceConfig, empty: list[int]) -> QuadraticForm:
        stats = self._acc.result()
        return reduced_quadratic_form(stats.with_pooled(empty) if empty else stats, config)

    def pooled_moments(self) -> Moments:
        """The exact moments of all groups merged (K = 1), from the first pass: within-class
        scatter plus the scatter of the class means."""
        return self._acc.pooled_moments()
