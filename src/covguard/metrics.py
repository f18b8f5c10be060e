"""Detection metrics for scores where a LARGER score means MORE anomalous.

Every function takes the scores of in-distribution (clean) samples, ``scores_in`` of shape
(N_in,), and of shifted (OOD, adversarial, shortcut) samples, ``scores_out`` of shape (N_out,),
and is a thin wrapper on :mod:`sklearn.metrics`:

==================  =================  =====================  =====================================
metric              positive class     confidence             meaning
==================  =================  =====================  =====================================
``auroc``           shifted            ``score``              P(score_out > score_in) + P(tie) / 2;
                                                              the same with either positive class
``fpr_at_95tpr``    in-distribution    ``-score``             fraction of shifted samples accepted
                                                              when 95% of clean ones are accepted
``aupr_in``         in-distribution    ``-score``             average precision
``aupr_out``        shifted            ``score``              average precision
==================  =================  =====================  =====================================

Two conventions for "FPR at 95% TPR" are in use. :func:`fpr_at_tpr` (used by :func:`evaluate`)
takes in-distribution as the positive class (ODIN, OpenOOD v1). :func:`fpr_at_95tpr_ood_positive`
takes shifted samples as positive: the fraction of clean samples flagged when 95% of the shifted
ones are flagged; this is the number OpenOOD v1.5 reports (``auc_and_fpr_recall`` in
``openood/evaluators/metrics.py``). Both are equal for two Gaussians of equal variance and can
differ a lot otherwise, so say which one a table reports.

Ties and thresholds: a threshold accepts or rejects all samples of one score together, so the
ROC curve is the sklearn step curve over distinct scores. The FPR at a TPR level is the smallest
FPR among the operating points whose TPR is at least that level, read from
``roc_curve(..., drop_intermediate=False)`` without interpolation. (OpenOOD keeps the default
``drop_intermediate=True``, which can skip the operating point that first reaches the level and
then returns a larger FPR.)

AUPR is :func:`sklearn.metrics.average_precision_score` (a step-wise sum), not the trapezoidal
``auc(recall, precision)`` of OpenOOD, which interpolates linearly between PR points and reads a
little higher.

Non-finite scores: ``+inf`` is legal (a detector gives it to an input whose features are not
finite) and ranks above every finite score. sklearn rejects infinities, so when a ``+inf`` is
present all scores are replaced by their dense ranks before sklearn is called; the metrics depend
only on the order of the scores, ties included, so the values are unchanged. ``NaN`` and ``-inf``
are rejected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "DetectionMetrics",
    "check_scores",
    "evaluate",
    "fpr_at_95tpr_ood_positive",
    "fpr_at_tpr",
    "roc_points",
]

Scores = ArrayLike | torch.Tensor


@dataclass(frozen=True)
class DetectionMetrics:
    """Detection metrics of one (in-distribution, shifted) pair of score sets.

    Attributes
    ----------
    auroc : float
        Area under the ROC curve, in [0, 1]; 0.5 is chance, 1 perfect separation.
    fpr_at_95tpr : float
        Fraction of shifted samples accepted as in-distribution at the threshold that accepts
        95% of the in-distribution samples (in-distribution positive); lower is better.
    aupr_in : float
        Average precision with in-distribution positive and ``-score`` as confidence.
    aupr_out : float
        Average precision with shifted samples positive and ``score`` as confidence.
    n_in : int
        Number of in-distribution samples.
    n_out : int
        Number of shifted samples.
    """

    auroc: float
    fpr_at_95tpr: float
    aupr_in: float
    aupr_out: float
    n_in: int
    n_out: int

    def to_dict(self) -> dict[str, float | int]:
        """Fields as a plain ``dict`` of Python numbers, in declaration order."""
        return asdict(self)


def check_scores(scores: Scores, name: str) -> np.ndarray:
    """Validate one set of detector scores and return it as a float64 array.

    Parameters
    ----------
    scores : array-like or Tensor of shape (N,)
        Detector scores, larger = more anomalous. A tensor may live on any device and require
        grad; it is detached and copied to the CPU.
    name : str
        Argument name used in error messages (e.g. ``"scores_in"``).

    Returns
    -------
    ndarray of shape (N,)
        The scores in float64.

    Raises
    ------
    ValueError
        If ``scores`` is not numeric, not 1-D, empty, or contains ``NaN`` or ``-inf``
        (``+inf`` is allowed).

    Examples
    --------
    >>> check_scores([0.5, float("inf")], "scores_out")
    array([0.5, inf])
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a 1-D array of real scores; got {type(scores).__name__}: {err}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (N,); got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must contain at least one score; got shape (0,)")
    n_nan = int(np.isnan(arr).sum())
    n_neg_inf = int(np.isneginf(arr).sum())
    if n_nan or n_neg_inf:
        raise ValueError(
            f"{name} must be finite or +inf; got {n_nan} NaN and {n_neg_inf} -inf values out of {arr.size}"
        )
    return arr


def _labels_and_scores(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate validated scores with labels 1 = shifted, 0 = in-distribution.

    Scores are replaced by dense ranks when one is infinite (see the module docstring); callers
    that negate scores turn ``+inf`` into ``-inf``, which ranks below every finite score.

    Returns
    -------
    is_out : ndarray of shape (N_in + N_out,)
        0 for in-distribution, 1 for shifted samples.
    scores : ndarray of shape (N_in + N_out,)
        Finite scores with the order (and ties) of the inputs.
    """
    scores = np.concatenate([scores_in, scores_out])
    is_out = np.concatenate([np.zeros(scores_in.size, dtype=np.int64), np.ones(scores_out.size, dtype=np.int64)])
    if np.isinf(scores).any():
        scores = np.unique(scores, return_inverse=True)[1].astype(np.float64)
    return is_out, scores


def _fpr_at_tpr(positive: np.ndarray, negative: np.ndarray, tpr: float) -> float:
    """Smallest FPR with TPR >= ``tpr`` when a LARGER value means MORE positive.

    Parameters
    ----------
    positive : ndarray of shape (P,)
        Confidences of the positive class.
    negative : ndarray of shape (Q,)
        Confidences of the negative class.
    tpr : float
        Target true-positive rate in (0, 1].
    """
    is_negative, conf = _labels_and_scores(positive, negative)
    fprs, tprs, _ = roc_curve(1 - is_negative, conf, drop_intermediate=False)
    # fprs is non-decreasing and tprs reaches 1 at the last point, so the first hit is the smallest FPR
    return float(fprs[np.argmax(tprs >= tpr)])


def _check_tpr(tpr: float) -> float:
    """Validate a target TPR in (0, 1]."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1]; got {tpr!r}")
    return float(tpr)


def fpr_at_tpr(scores_in: Scores, scores_out: Scores, tpr: float = 0.95) -> float:
    """FPR at a TPR level with in-distribution as the positive class (ODIN, OpenOOD v1).

    A sample is accepted as in-distribution when its score is at most a threshold (detector
    confidence ``-score``). Returns the fraction of shifted samples accepted, at the smallest
    threshold that accepts at least a fraction ``tpr`` of the in-distribution samples. Tied scores
    are accepted together; no interpolation.

    Parameters
    ----------
    scores_in : array-like or Tensor of shape (N_in,)
        Scores of in-distribution samples (larger = more anomalous).
    scores_out : array-like or Tensor of shape (N_out,)
        Scores of shifted samples.
    tpr : float, default 0.95
        Fraction of in-distribution samples to accept, in (0, 1].

    Returns
    -------
    float
        False-positive rate in [0, 1]; lower is better.

    Raises
    ------
    ValueError
        On invalid scores (see :func:`check_scores`) or ``tpr`` outside (0, 1].

    See Also
    --------
    fpr_at_95tpr_ood_positive : the convention with shifted samples positive.

    Examples
    --------
    >>> fpr_at_tpr([0.0] * 18 + [1.0, 2.0], [1.0, 2.0, 10.0, 10.0])
    0.25
    """
    tpr = _check_tpr(tpr)
    s_in, s_out = check_scores(scores_in, "scores_in"), check_scores(scores_out, "scores_out")
    return _fpr_at_tpr(-s_in, -s_out, tpr)


def fpr_at_95tpr_ood_positive(scores_in: Scores, scores_out: Scores) -> float:
    """FPR at 95% TPR with shifted samples as the positive class (OpenOOD v1.5).

    A sample is flagged when its score is at least a threshold. Returns the fraction of
    in-distribution samples flagged, at the largest threshold that flags at least 95% of the
    shifted samples. Tied scores are flagged together; no interpolation.

    Parameters
    ----------
    scores_in : array-like or Tensor of shape (N_in,)
        Scores of in-distribution samples (larger = more anomalous).
    scores_out : array-like or Tensor of shape (N_out,)
        Scores of shifted samples.

    Returns
    -------
    float
        False-positive rate in [0, 1]; lower is better.

    Raises
    ------
    ValueError
        On invalid scores (see :func:`check_scores`).

    See Also
    --------
    fpr_at_tpr : the convention with in-distribution positive, used by :func:`evaluate`.

    Examples
    --------
    >>> fpr_at_95tpr_ood_positive([0.0] * 18 + [1.0, 2.0], [1.0, 2.0, 10.0, 10.0])
    0.1
    """
    s_in, s_out = check_scores(scores_in, "scores_in"), check_scores(scores_out, "scores_out")
    return _fpr_at_tpr(s_out, s_in, 0.95)


def evaluate(scores_in: Scores, scores_out: Scores) -> DetectionMetrics:
    """AUROC, FPR at 95% TPR (in-distribution positive), AUPR-In and AUPR-Out.

    Parameters
    ----------
    scores_in : array-like or Tensor of shape (N_in,)
        Scores of in-distribution (clean) samples; larger = more anomalous.
    scores_out : array-like or Tensor of shape (N_out,)
        Scores of shifted (OOD, adversarial) samples. ``+inf`` is allowed in both.

    Returns
    -------
    DetectionMetrics
        The four metrics (conventions in the module docstring) and the two sample counts.

    Raises
    ------
    ValueError
        On invalid scores (see :func:`check_scores`).

    Examples
    --------
    >>> m = evaluate([0.1, 0.2, 0.3], [0.4, 0.5])
    >>> m.auroc, m.fpr_at_95tpr, m.aupr_in, m.aupr_out
    (1.0, 0.0, 1.0, 1.0)
    """
    s_in, s_out = check_scores(scores_in, "scores_in"), check_scores(scores_out, "scores_out")
    is_out, scores = _labels_and_scores(s_in, s_out)
    return DetectionMetrics(
        auroc=float(roc_auc_score(is_out, scores)),
        fpr_at_95tpr=_fpr_at_tpr(-s_in, -s_out, 0.95),
        aupr_in=float(average_precision_score(1 - is_out, -scores)),
        aupr_out=float(average_precision_score(is_out, scores)),
        n_in=int(s_in.size),
        n_out=int(s_out.size),
    )


def roc_points(scores_in: Scores, scores_out: Scores) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve for plotting, shifted samples positive and ``score`` as confidence.

    Parameters
    ----------
    scores_in : array-like or Tensor of shape (N_in,)
        Scores of in-distribution samples (larger = more anomalous).
    scores_out : array-like or Tensor of shape (N_out,)
        Scores of shifted samples.

    Returns
    -------
    fpr : ndarray of shape (M,)
        Fraction of in-distribution samples flagged, non-decreasing from 0 to 1.
    tpr : ndarray of shape (M,)
        Fraction of shifted samples flagged, non-decreasing from 0 to 1.

    Raises
    ------
    ValueError
        On invalid scores (see :func:`check_scores`).
    """
    s_in, s_out = check_scores(scores_in, "scores_in"), check_scores(scores_out, "scores_out")
    is_out, scores = _labels_and_scores(s_in, s_out)
    fpr, tpr, _ = roc_curve(is_out, scores)
    return fpr, tpr
