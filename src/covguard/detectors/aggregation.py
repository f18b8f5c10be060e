"""Aggregate a per-patch distance map into one score per image.

- ``"mean"``: the mean over the ``L = H' W'`` patch positions (the original method; the i.i.d.
  patch log-likelihood up to constants);
- ``"max"``: the largest patch distance;
- ``"topq"``: the mean of the ``n = max(1, round(top_fraction * L))`` largest patch distances,
  between the two: a small anomalous region counts without resting on one patch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AGGREGATES", "aggregate_map", "check_top_fraction", "top_count"]

AGGREGATES = ("mean", "max", "topq")


def check_top_fraction(top_fraction: float) -> None:
    """Raise ValueError unless ``top_fraction`` is a number in (0, 1]."""
    if isinstance(top_fraction, bool) or not isinstance(top_fraction, (int, float)) or not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be a number in (0, 1]; got {top_fraction!r}")


def top_count(n_patches: int, top_fraction: float) -> int:
    """Patches averaged by ``"topq"`` out of ``n_patches``: ``round(top_fraction * L)``, at least 1."""
    return max(1, round(top_fraction * n_patches))


def aggregate_map(m: Tensor, aggregate: str, top_fraction: float) -> Tensor:
    """One float64 score per image from a distance map.

    Parameters
    ----------
    m : Tensor of shape (N, H', W')
    aggregate : {"mean", "max", "topq"}
    top_fraction : float
        Share of the patches averaged by ``"topq"`` (ignored otherwise).

    Returns
    -------
    Tensor of shape (N,), float64
    """
    flat = m.flatten(1)  # (N, L)
    if aggregate == "mean":
        return flat.mean(1, dtype=torch.float64)
    if aggregate == "max":
        return flat.amax(1).double()
    top = flat.topk(top_count(flat.shape[1], top_fraction), dim=1, sorted=False).values  # (N, n)
    return top.mean(1, dtype=torch.float64)
