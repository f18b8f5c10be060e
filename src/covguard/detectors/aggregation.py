"""Aggregate a per-patch distance map into one score per image.

- ``"mean"``: the mean over the ``L = H' W'`` patch positions (the original method; the i.i.d.
  patch log-likelihood up to constants);
- ``"max"``: the largest patch distance;
- ``"topq"``: the mean of the ``n = max(1, round(top_fraction * L))`` largest patch distances,
  between the two: a small anomalous region counts without resting on one patch.

:func:`aggregate_layers` aggregates the maps of every tapped layer, with the non-finite handling of
:class:`~covguard.detectors.patch_gaussian.PatchGaussian`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from covguard.detectors.class_weights import GroupRows
from covguard.detectors.patch_gaussian import PatchGaussian, saturate

__all__ = ["AGGREGATES", "aggregate_layers", "aggregate_map", "check_top_fraction", "top_count"]

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


def aggregate_layers(
    gaussians: Mapping[str, PatchGaussian], feats: Mapping[str, Tensor], groups: GroupRows | None, aggregate: str, top_fraction: float
) -> tuple[Tensor, bool]:
    """Aggregated score of each layer, and whether every score is finite.

    The maps (:meth:`PatchGaussian.raw_map`) are checked with one host sync for all layers: a
    map holding NaN or inf makes the sum of all scores non-finite (``"mean"``), or the sum of
    the scores and of the maps (``"max"`` and ``"topq"``, which may pass over a -inf). Only
    when that sum is not finite is each map inspected (:meth:`PatchGaussian.check_finite`):
    overflows are recomputed in float64 and the scores of images with non-finite activations
    are +inf.

    Parameters
    ----------
    gaussians : mapping of layer to PatchGaussian
        The fitted layers, in the order of the score columns.
    feats : mapping of layer to Tensor of shape (N, C, H, W)
    groups : GroupRows, optional
        Weight of each group in each image's distance (None: the one group).
    aggregate : {"mean", "max", "topq"}
    top_fraction : float

    Returns
    -------
    scores : Tensor of shape (N, L), float64
        Finite wherever the activations are finite (but where float64 overflows); +inf for
        images whose activations are not.
    finite : bool
        Whether every score is finite.
    """
    maps = {layer: g.raw_map(feats[layer], groups) for layer, g in gaussians.items()}  # {layer: (N, H', W')}
    if aggregate == "mean":  # every layer's mean at once: the concatenated maps times 1 / L_l on layer l's positions
        flat = torch.cat([m.flatten(1) for m in maps.values()], dim=1).double()  # (N, sum L_l)
        sizes = tuple(m.shape[1] * m.shape[2] for m in maps.values())
        scores = flat @ _mean_weights(sizes, flat.device)  # (N, L)
    else:
        scores = torch.stack([aggregate_map(m, aggregate, top_fraction) for m in maps.values()], dim=1)  # (N, L)
    probe = scores.sum()  # () float64, non-finite with any score (or where finite scores overflow it)
    if aggregate != "mean":
        probe = torch.stack([probe, *(m.sum(dtype=torch.float64) for m in maps.values())]).sum()
    if math.isfinite(probe.item()):
        return scores, True
    cols = []
    for layer, m in maps.items():
        m, ok = gaussians[layer].check_finite(feats[layer], groups, m)
        s = aggregate_map(m, aggregate, top_fraction)  # (N,) float64
        cols.append(s if ok is None else saturate(s, ok, torch.float64).masked_fill(~ok, float("inf")))
    return torch.stack(cols, dim=1), False


@functools.lru_cache(maxsize=64)
def _mean_weights(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """(sum(sizes), L) float64 averaging weights: ``1 / sizes[l]`` on the rows of layer ``l``."""
    weights = torch.zeros(sum(sizes), len(sizes), dtype=torch.float64, device=device)
    start = 0
    for column, size in enumerate(sizes):
        weights[start : start + size, column] = 1.0 / size
        start += size
    return weights
