"""The suite's numbers: fused scores from members' scores, per-category metrics, mean and worst
over categories, and the fused detectors' scoring cost."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from covguard import pvalues
from covguard.bench.suite_config import FUSED_MEMBERS, TAIL_SIZE, fused_detectors
from covguard.detectors import Detector
from covguard.detectors.fused import FusedDetector
from covguard.metrics import evaluate

__all__ = ["category_metrics", "fuse", "summarize", "time_fused", "with_fused"]


def fuse(
    member_scores: Mapping[str, Tensor], calibration: Mapping[str, Tensor], members: Sequence[str], *, rule: str,
    tail_size: int = TAIL_SIZE,
) -> Tensor:
    """The fused score (N,) float64 of members' raw scores, as FusedDetector computes it.

    Parameters
    ----------
    member_scores : mapping of str to Tensor of shape (N,)
    calibration : mapping of str to Tensor of shape (n,)
        Each member's scores of held-out in-distribution images (any order).
    members : sequence of str
    rule : {"fisher", "minp"}
    tail_size : int
    """
    cols = []
    for name in members:
        cal = calibration[name].double().sort().values  # (n,)
        cols.append(pvalues.log_p_values(member_scores[name], cal, pvalues.tail_scale(cal, tail_size)))
    return pvalues.RULES[rule](torch.stack(cols, dim=1))  # (N, M) -> (N,)


def with_fused(scores: Mapping[str, Tensor], calibration: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``scores`` {detector: (N,)} plus every fused detector of :func:`fused_detectors`."""
    out = dict(scores)
    for name, (members, rule) in fused_detectors().items():
        out[name] = fuse(scores, calibration, members, rule=rule)
    return out


def category_metrics(scores_in: Mapping[str, Tensor], scores_out: Mapping[str, Tensor]) -> dict[str, dict]:
    """Per detector: AUROC, detection rate at 5 % FPR (read on ``scores_in``), n_in, n_out."""
    out = {}
    for det, s_in in scores_in.items():
        m = evaluate(s_in, scores_out[det])
        out[det] = {"auroc": m.auroc, "detection_at_5fpr": 1.0 - m.fpr_at_95tpr, "n_in": m.n_in, "n_out": m.n_out}
    return out


@torch.no_grad()
def time_fused(detectors: Mapping[str, Detector], calibration: Mapping[str, Tensor], x: Tensor, *, repeats: int) -> dict:
    """Scoring seconds of each fused member set (Fisher) and of each member alone, medians of
    ``repeats`` interleaved calls on ``x`` (after one warm-up call each).

    Returns
    -------
    dict
        {fused name: {"seconds": {member or "fused": s}, "costliest": member, "ratio": fused / costliest}}.
    """
    out = {}
    for name, members in FUSED_MEMBERS.items():
        chosen = {m: detectors[m] for m in members}
        fused = FusedDetector(chosen, rule="fisher", tail_size=TAIL_SIZE)
        fused.set_calibration({m: calibration[m] for m in members})
        timed: dict[str, Detector] = {**chosen, "fused": fused}
        times: dict[str, list[float]] = {k: [] for k in timed}
        for det in timed.values():
            det.score(x)
        for _ in range(repeats):
            for k, det in timed.items():
                tic = time.perf_counter()
                det.score(x)
                times[k].append(time.perf_counter() - tic)
        median = {k: statistics.median(v) for k, v in times.items()}
        costliest = max(members, key=median.get)
        out[name] = {"seconds": median, "costliest": costliest, "ratio": median["fused"] / median[costliest]}
    return out


def summarize(per_category: Mapping[str, float | None]) -> dict:
    """Mean and worst (lowest) value over categories; categories without a value (None) are left out.

    Returns
    -------
    dict
        ``{"mean": float, "worst": float, "worst_category": str, "n_categories": int}``; NaN means
        and None categories when no category has a value.

    Examples
    --------
    >>> summarize({"cifar100": 0.7, "pgd_8": 0.99, "blank": 0.2})
    {'mean': 0.63, 'worst': 0.2, 'worst_category': 'blank', 'n_categories': 3}
    """
    values = {k: v for k, v in per_category.items() if v is not None}
    if not values:
        return {"mean": math.nan, "worst": math.nan, "worst_category": None, "n_categories": 0}
    worst = min(values, key=values.get)
    return {"mean": statistics.fmean(values.values()), "worst": values[worst], "worst_category": worst, "n_categories": len(values)}
