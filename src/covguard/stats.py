"""Streaming first and second moments, merged with Chan's formula.

The statistics of ``K`` groups (classes) of ``D``-dimensional vectors are kept as weighted
sufficient statistics in float64: total weight ``n`` (K,), mean (K, D) and centered scatter
``M2 = sum_m w_m (x_m - mean)(x_m - mean)^T`` (K, D, D). Each batch is reduced after centering
on its own mean, then merged:

``M2 = M2_a + M2_b + d d^T * n_a n_b / (n_a + n_b)``, ``d = mean_b - mean_a``,

which avoids the cancellation of ``E[x x^T] - mean mean^T`` when the vectors have a large mean.
Only the statistics are kept, never the vectors.

Across processes (:func:`all_reduce_moments`) the same merge runs as three sums: ``n``,
``n * mean`` (giving the global mean ``g``) and each process's scatter shifted to ``g``,
``M2 + n (mean - g)(mean - g)^T``; the sum of the shifted scatters is the scatter of the union.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Moments", "StreamingMoments", "all_reduce_moments", "batch_moments", "merge_moments", "zero_moments"]


@dataclass(frozen=True)
class Moments:
    """Weighted moments of ``K`` groups of ``D``-dimensional vectors (float64).

    Attributes
    ----------
    n : Tensor of shape (K,)
        Total weight of each group (a count for 0/1 weights).
    mean : Tensor of shape (K, D)
        Weighted mean of each group; zero for a group of weight 0.
    scatter : Tensor of shape (K, D, D)
        Weighted centered scatter ``sum_m w_mk (x_m - mean_k)(x_m - mean_k)^T``.
    """

    n: Tensor
    mean: Tensor
    scatter: Tensor

    @property
    def dim(self) -> int:
        """Vector dimension ``D``."""
        return self.mean.shape[-1]

    @property
    def n_groups(self) -> int:
        """Number of groups ``K``."""
        return self.mean.shape[0]

    def covariance(self) -> Tensor:
        """Maximum-likelihood covariance ``scatter / n`` of each group, shape (K, D, D).

        Raises
        ------
        ValueError
            If a group has zero total weight.
        """
        empty = (self.n <= 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"groups {empty} have no samples (total weight 0); cannot form a covariance")
        return self.scatter / self.n[:, None, None]

    def pooled(self) -> Moments:
        """Merge all groups into one: the moments of the union, shape K = 1."""
        total = Moments(self.n[:1], self.mean[:1], self.scatter[:1])
        for k in range(1, self.n_groups):
            total = merge_moments(total, Moments(self.n[k : k + 1], self.mean[k : k + 1], self.scatter[k : k + 1]))
        return total


def batch_moments(x: Tensor, weights: Tensor | None = None) -> Moments:
    """Moments of one batch, reduced in the dtype of ``x`` after centering, returned in float64.

    ``x`` is centered on its own (weighted) mean computed in its dtype; the small residual mean
    of the centered rows is added back in float64 (``scatter = sum w xc xc^T - n r r^T``), so no
    float64 copy of ``x`` is made for float32 input and the scatter is one product in the dtype of
    ``x``. With at least as many rows as dimensions, only the upper block triangle of the
    symmetric scatter is multiplied (``_SYMMETRIC_BLOCKS`` column blocks: 62% of the
    multiply-adds), then mirrored.

    Parameters
    ----------
    x : Tensor of shape (M, D)
        Vectors (e.g. patch vectors of a feature map).
    weights : Tensor of shape (M, K), optional
        Non-negative weight of each vector in each group (one-hot labels, class probabilities).
        ``None`` means one group with unit weights.

    Returns
    -------
    Moments
        With K groups (K = 1 when ``weights`` is None).
    """
    if weights is None:
        n = torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)
        mean, scatter = _centered_moments(x, None)
        return Moments(n, mean[None], scatter[None])
    n = weights.double().sum(0)  # (K,)
    K, D = weights.shape[1], x.shape[1]
    mean = torch.zeros(K, D, dtype=torch.float64, device=x.device)
    scatter = torch.zeros(K, D, D, dtype=torch.float64, device=x.device)
    for k in (n > 0).nonzero().flatten().tolist():
        rows = (weights[:, k] > 0).nonzero().flatten()
        mean[k], scatter[k] = _centered_moments(x[rows], weights[rows, k].to(x.dtype))  # (M_k, D) rows of group k
    return Moments(n, mean, scatter)


# Column blocks of the symmetric scatter product (only blocks on or above the diagonal are multiplied).
_SYMMETRIC_BLOCKS = 4
_SYMMETRIC_MIN_DIM = 256  # below this a single product is faster


def _power_of_two_scale(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Rows (M, D) with each column divided by a power of two near its largest magnitude (exact),
    and those scales (D,); float64 rows are returned as they are, with None.

    In float32, products of activations near 1e-30 or 1e30 would underflow or overflow; the
    scales are multiplied back in float64.
    """
    if x.dtype == torch.float64:
        return x, None
    _, exponent = torch.frexp(x.abs().amax(0))  # (D,)
    scale = torch.ldexp(torch.ones_like(x[0]), exponent)  # (D,) powers of two
    return x / scale, scale


def _center(x: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rows (M, D) centered on their weighted mean in the dtype of ``x``.

    Returns the mean (D,) float64, the centered rows ``xc`` (M, D), the weighted centered rows
    ``xw`` (M, D), the total weight () float64 and the residual mean of the centered rows (D,)
    float64 (about the rounding error): the scatter is ``xw^T xc - total resid resid^T``.
    """
    total = x.new_tensor(float(x.shape[0])) if w is None else w.sum()
    first = (x.sum(0) if w is None else w @ x) / total  # (D,) mean in the dtype of x
    xc = x - first  # (M, D)
    xw = xc if w is None else xc * w[:, None]  # (M, D)
    resid = (xw.sum(0) / total).double()  # (D,)
    return first.double() + resid, xc, xw, total.double(), resid


def _centered_moments(x: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weighted mean (D,) and scatter (D, D) of rows ``x`` (M, D), float64; reduced in the dtype of
    ``x`` after :func:`_power_of_two_scale` and centering."""
    x, scale = _power_of_two_scale(x)
    mean, xc, xw, total, resid = _center(x, w)
    scatter = _symmetric_product(xw, xc).double().addr_(resid * -total, resid)
    if scale is None:
        return mean, scatter
    s = scale.double()
    return mean * s, scatter.mul_(s[:, None]).mul_(s[None, :])


def _symmetric_product(a: Tensor, b: Tensor) -> Tensor:
    """``a^T b`` (D, D) for (M, D) inputs whose product is symmetric, multiplying the upper blocks only."""
    M, D = a.shape
    if D < _SYMMETRIC_MIN_DIM or M < D:  # few rows: the product is cheap next to copying blocks
        return a.T @ b
    out = torch.empty(D, D, dtype=a.dtype, device=a.device)
    bounds = [round(i * D / _SYMMETRIC_BLOCKS) for i in range(_SYMMETRIC_BLOCKS + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[lo:hi, lo:] = a[:, lo:hi].T @ b[:, lo:]  # (D/G, D - lo)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Merge the moments of two disjoint sets with Chan's formula (groupwise).

    Parameters
    ----------
    a, b : Moments
        Moments with the same K and D.

    Returns
    -------
    Moments
        The moments of the union. Groups empty in both stay empty (zero mean and scatter).
    """
    n = a.n + b.n  # (K,)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = b.mean - a.mean  # (K, D)
    mean = a.mean + delta * (b.n / safe)[:, None]
    coef = a.n * b.n / safe  # (K,)
    scatter = a.scatter + b.scatter + coef[:, None, None] * delta[:, :, None] * delta[:, None, :]
    return Moments(n, mean, scatter)


def zero_moments(dim: int, n_groups: int = 1, *, device: torch.device | str | None = None) -> Moments:
    """The moments of an empty set: ``K`` groups of weight 0, zero mean and scatter (float64)."""
    return Moments(
        torch.zeros(n_groups, dtype=torch.float64, device=device),
        torch.zeros(n_groups, dim, dtype=torch.float64, device=device),
        torch.zeros(n_groups, dim, dim, dtype=torch.float64, device=device),
    )


def all_reduce_moments(moments: Moments, *, group: object | None = None) -> Moments:
    """Merge the moments held by every process of a ``torch.distributed`` group (Chan, generalized).

    Every process calls this with the moments of its own shard (:func:`zero_moments` for an
    empty shard) and receives the moments of the union. Three float64 sums:

    ``n = sum_r n_r``, ``g = sum_r n_r mean_r / n``, ``M2 = sum_r [M2_r + n_r (mean_r - g)(mean_r - g)^T]``.

    Parameters
    ----------
    moments : Moments
        This process's moments, K groups of dimension D (same K, D on every process), on a device
        the process group's backend supports (CPU for ``gloo``, CUDA for ``nccl``).
    group : ProcessGroup, optional
        Defaults to the world.

    Returns
    -------
    Moments
        The same on every process. Groups empty everywhere stay empty (zero mean and scatter).

    Raises
    ------
    RuntimeError
        If ``torch.distributed`` is not initialized.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_moments needs an initialized torch.distributed process group (init_process_group)")
    n_local, mean_local, scatter_local = moments.n.double(), moments.mean.double(), moments.scatter.double()
    n = n_local.clone()  # (K,)
    dist.all_reduce(n, group=group)
    total = mean_local * n_local[:, None]  # (K, D)
    dist.all_reduce(total, group=group)
    mean = total / torch.where(n > 0, n, torch.ones_like(n))[:, None]  # (K, D)
    delta = mean_local - mean  # (K, D)
    scatter = scatter_local + n_local[:, None, None] * delta[:, :, None] * delta[:, None, :]  # (K, D, D)
    dist.all_reduce(scatter, group=group)
    return Moments(n, mean, scatter)


# Rows held back before a merge: every merge writes K (D, D) scatters, so a stream of small
# batches (a few positions per image, many groups) is reduced in chunks of about this size.
_PENDING_BYTES = 64 << 20


class StreamingMoments:
    """Accumulate the moments of ``K`` groups of vectors over a stream of batches.

    Batches are held back (up to about 64 MiB of rows) and reduced together, so that the cost of
    merging into the ``K`` running (D, D) scatters is paid per chunk, not per batch. Reading
    :attr:`moments` reduces what is held back.

    Parameters
    ----------
    dim : int
        Vector dimension ``D``.
    n_groups : int, default 1
        Number of groups ``K`` (classes).
    reduce_dtype : torch.dtype, default torch.float64
        Dtype in which each centered chunk is reduced before the float64 merge. float32 is
        faster on accelerators and loses about 1e-6 relative accuracy on large chunks.

    Examples
    --------
    >>> acc = StreamingMoments(3)
    >>> for batch in torch.randn(10, 4, 3):
    ...     acc.update(batch)
    >>> acc.moments.n
    tensor([40.], dtype=torch.float64)
    """

    def __init__(self, dim: int, *, n_groups: int = 1, reduce_dtype: torch.dtype = torch.float64) -> None:
        if dim < 1:
            raise ValueError(f"dim must be a positive integer; got {dim}")
        if n_groups < 1:
            raise ValueError(f"n_groups must be a positive integer; got {n_groups}")
        self.dim = dim
        self.n_groups = n_groups
        self.reduce_dtype = reduce_dtype
        self._moments: Moments | None = None
        self._owned: Moments | None = None  # the moments this accumulator made, safe to update in place
        self._pending: list[tuple[Tensor, Tensor | None]] = []  # batches (M, D), (M, K) not reduced yet
        self._pending_bytes = 0

    @property
    def moments(self) -> Moments | None:
        """The moments of every batch added so far (float64), or None before the first."""
        self._flush()
        return self._moments

    @moments.setter
    def moments(self, value: Moments | None) -> None:
        if self._pending:
            raise ValueError("moments cannot be replaced while batches are held back; read moments first")
        self._moments = value

    def update(self, x: Tensor, weights: Tensor | None = None, *, check_finite: bool = True) -> StreamingMoments:
        """Add a batch.

        Parameters
        ----------
        x : Tensor of shape (M, D)
            Vectors to add.
        weights : Tensor of shape (M, K), optional
            Non-negative weight of each vector in each group; required when K > 1.
        check_finite : bool
            Reject NaN or inf in ``x`` (a full pass over it). Callers that validated the data
            they derive ``x`` from (the detectors check every feature map) skip it; ``weights``
            are always checked.

        Returns
        -------
        StreamingMoments
            ``self``.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (M, D) with D={self.dim}; got {tuple(x.shape)}")
        if check_finite and not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf values; moments would be corrupted")
        if weights is None and self.n_groups > 1:
            raise ValueError(f"weights of shape (M, {self.n_groups}) are required with n_groups={self.n_groups}")
        if weights is not None:
            if weights.shape != (x.shape[0], self.n_groups):
                raise ValueError(f"weights must be (M, K) = ({x.shape[0]}, {self.n_groups}); got {tuple(weights.shape)}")
            if not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError("weights must be finite and non-negative")
        if x.shape[0] == 0:
            return self
        held = x.to(self.reduce_dtype, copy=True)  # never a view of the caller's tensor
        self._pending.append((held, None if weights is None else weights.clone()))
        self._pending_bytes += held.numel() * held.element_size()
        if self._pending_bytes >= _PENDING_BYTES:
            self._flush()
        return self

    def _flush(self) -> None:
        """Reduce the batches held back and merge them into the running moments."""
        if not self._pending:
            return
        xs, ws = zip(*self._pending)
        self._pending, self._pending_bytes = [], 0
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        weights = None
        if any(w is not None for w in ws):
            weights = torch.cat([x_.new_ones(x_.shape[0], 1) if w is None else w for x_, w in zip(xs, ws)])
        if self._moments is None:
            self._moments = self._owned = batch_moments(x, weights)
        elif weights is None:
            self._moments = self._owned = merge_moments(self._moments, batch_moments(x))
        else:
            self._add_groups(x, weights)

    def _add_groups(self, x: Tensor, weights: Tensor) -> None:
        """Merge a weighted chunk (M, D), (M, K) into the running moments group by group, in place
        (Chan's formula): no (K, D, D) chunk scatter; each group's product lands in one reused
        (D, D) buffer and is added, scaled back, into its running scatter."""
        if self._moments is not self._owned:  # moments set from outside: never written in place
            self._moments = Moments(self._moments.n.clone(), self._moments.mean.clone(), self._moments.scatter.clone())
            self._owned = self._moments
        n, mean, scatter = self._moments.n, self._moments.mean, self._moments.scatter
        x, scale = _power_of_two_scale(x)  # one scale per chunk, shared by its groups
        s = None if scale is None else scale.double()
        s_outer = None if s is None else torch.outer(s, s)  # (D, D)
        product = x.new_empty(self.dim, self.dim)
        for k in (weights > 0).any(0).nonzero().flatten().tolist():
            rows = (weights[:, k] > 0).nonzero().flatten()
            w = weights[rows, k]
            mean_b, xc, xw, total, resid = _center(x[rows], w.to(x.dtype))
            if len(rows) >= self.dim:
                product = _symmetric_product(xw, xc)
            else:
                torch.mm(xw.T, xc, out=product)
            if s is None:
                scatter[k].add_(product)
            else:
                scatter[k].addcmul_(product, s_outer)
                mean_b, resid = mean_b * s, resid * s
            n_b = w.double().sum()
            grown = n[k] + n_b
            delta = mean_b - mean[k]  # (D,)
            scatter[k].addr_(resid * -total, resid).addr_(delta * (n[k] * n_b / grown), delta)
            mean[k].add_(delta * (n_b / grown))
            n[k] = grown

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Merge another accumulator (e.g. from another data shard) into this one; returns ``self``."""
        if (other.dim, other.n_groups) != (self.dim, self.n_groups):
            raise ValueError(
                f"other must have dim={self.dim}, n_groups={self.n_groups}; got dim={other.dim}, n_groups={other.n_groups}"
            )
        theirs, mine = other.moments, self.moments
        if theirs is not None and mine is None:
            self._moments = theirs  # shared with ``other``: copied before any in-place update
        elif theirs is not None:
            self._moments = self._owned = merge_moments(mine, theirs)  # new tensors, ours to update
        return self

    def all_reduce(self, *, group: object | None = None, device: torch.device | str | None = None) -> StreamingMoments:
        """Replace this process's moments by those of every process's data (:func:`all_reduce_moments`).

        Every process of ``group`` must call it; a process that saw no data takes part with
        zero weight. ``device`` places the zero moments of such a process (default CPU).
        Returns ``self``.
        """
        local = self.moments
        if local is None:
            local = zero_moments(self.dim, self.n_groups, device=device)
        self._moments = self._owned = all_reduce_moments(local, group=group)
        return self
