"""Conformal p-values of detector scores, and the rules that combine several into one score.

A detector's score ``s`` becomes an empirical (conformal) upper-tail p-value against the scores
``c_1 <= ... <= c_n`` of ``n`` held-out in-distribution images (never test data):

``p(s) = (1 + #{i : c_i >= s}) / (n + 1)``                        for ``s <= c_n``,

``p(s) = exp(-(s - c_n) / sigma) / (n + 1)``                      for ``s > c_n``.

Beyond the largest calibration score the empirical p-value would stay at ``1 / (n + 1)``, so every
input past ``c_n`` would tie. The tail continues it with an exponential (a generalized Pareto
distribution of shape 0): ``P(S > s | S > c_n) = exp(-(s - c_n) / sigma)``, with ``P(S > c_n)``
taken as ``1 / (n + 1)``. ``sigma`` is the maximum-likelihood scale of the exponential fitted to the
``k`` largest calibration scores as exceedances over the ``(k + 1)``-th largest, ``u = c_{n-k}``:

``sigma = mean(c_{n-k+1}, ..., c_n) - c_{n-k}`` (:func:`tail_scale`).

The exponential is memoryless, so the scale fitted above ``u`` holds above ``c_n``. The p-value is
non-increasing in ``s`` and strictly decreasing beyond ``c_n``; the tail starts from
``1 / (n + 1)``, the empirical value just above ``c_n``, so it is continuous at the junction.
p-values are returned as ``log p`` (float64) so that extreme inputs keep ranking where ``p``
itself would underflow. A non-finite score (NaN, +inf, or -inf: a member that failed) gets
``p = 0`` (``log p = -inf``), which flags the input.

Combination rules, fixed in advance, each turning the (N, M) log p-values of ``M`` detectors into
a score (N,), larger = more anomalous:

- ``"fisher"``: ``-2 sum_j log p_j`` (chi-squared with ``2M`` degrees of freedom for independent
  uniform p-values; used here as a score, its threshold is calibrated empirically);
- ``"minp"``: ``-log p_Sidak`` with ``p_Sidak = 1 - (1 - min_j p_j)^M``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["RULES", "fisher_score", "log_p_values", "sidak_score", "tail_scale"]


def tail_scale(calibration: Tensor, tail_size: int) -> float:
    """Scale ``sigma`` of the exponential tail beyond the largest calibration score.

    Maximum-likelihood scale of an exponential fitted to the ``k = min(tail_size, n - 1)`` largest
    scores as exceedances over the ``(k + 1)``-th largest: ``mean(top k) - c_{n-k}``.

    Parameters
    ----------
    calibration : Tensor of shape (n,)
        Finite in-distribution scores, n >= 2, sorted ascending.
    tail_size : int
        ``k``, before clipping to ``n - 1``.

    Returns
    -------
    float
        ``sigma > 0``. When the top ``k + 1`` scores tie, the spread of all scores divided by
        ``n`` stands in (warned); when all scores tie, 1.0 (warned).
    """
    c = calibration.double()
    n = c.numel()
    k = min(tail_size, n - 1)
    sigma = float((c[n - k :] - c[n - k - 1]).mean())
    if sigma > 0:
        return sigma
    spread = float(c[-1] - c[0]) / n
    warnings.warn(
        f"the {k + 1} largest calibration scores tie at {float(c[-1]):.6g}: the tail scale falls back to "
        f"{'(max - min) / n' if spread > 0 else '1.0 (all scores tie)'}",
        RuntimeWarning,
        stacklevel=2,
    )
    return spread if spread > 0 else 1.0


def log_p_values(scores: Tensor, calibration: Tensor, scale: float) -> Tensor:
    """Natural log of the upper-tail p-value of each score against calibration scores.

    Parameters
    ----------
    scores : Tensor of shape (N,)
        Larger = more anomalous.
    calibration : Tensor of shape (n,)
        Finite held-out in-distribution scores, sorted ascending, float64.
    scale : float
        ``sigma`` of the tail (:func:`tail_scale`).

    Returns
    -------
    Tensor of shape (N,), float64, on the device of ``scores``
        ``log p`` in ``[-inf, 0]``: ``log((1 + #{c >= s}) / (n + 1))`` up to ``c_n``,
        ``-(s - c_n) / sigma - log(n + 1)`` beyond it, ``-inf`` for a non-finite score.
    """
    s = scores.double().reshape(-1)  # (N,)
    c = calibration.to(device=s.device, dtype=torch.float64)  # (n,)
    n = c.numel()
    at_least = n - torch.searchsorted(c, s, side="left")  # (N,) #{c >= s}
    log_norm = math.log(n + 1)
    inside = torch.log1p(at_least.double()) - log_norm
    tail = -(s - c[-1]) / scale - log_norm
    log_p = torch.where(s > c[-1], tail, inside)
    return log_p.masked_fill(~torch.isfinite(s), float("-inf"))


def fisher_score(log_p: Tensor) -> Tensor:
    """Fisher's statistic ``-2 sum_j log p_j`` of (N, M) log p-values, (N,); +inf where a p is 0."""
    return -2.0 * log_p.sum(1)


def sidak_score(log_p: Tensor) -> Tensor:
    """``-log(1 - (1 - min_j p_j)^M)`` of (N, M) log p-values, (N,); +inf where a p is 0.

    Computed as ``-(log p_min + log sum_{j<M} (1 - p_min)^j)``, which is exact and stays finite
    (about ``-log p_min - log M``) where ``p_min`` underflows.
    """
    m = log_p.shape[1]
    log_min = log_p.amin(1)  # (N,)
    q = -torch.expm1(log_min)  # (N,) 1 - p_min
    powers = q[:, None] ** torch.arange(m, device=log_p.device, dtype=log_p.dtype)  # (N, M) q^j
    return -(log_min + powers.sum(1).log())


#: Combination rules: name -> function of (N, M) log p-values returning scores (N,).
RULES: dict[str, Callable[[Tensor], Tensor]] = {"fisher": fisher_score, "minp": sidak_score}
