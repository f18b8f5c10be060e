"""GEN: generalized entropy of the top softmax probabilities (Liu, Lochman & Zach, 2023)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from covguard.detectors.base import warn_nonfinite
from covguard.detectors.state import TensorStateDetector

__all__ = ["GEN", "generalized_entropy"]


def generalized_entropy(logits: Tensor, gamma: float = 0.1, top_m: int = 100) -> Tensor:
    """``sum_{j in top-M} p_j^gamma (1 - p_j)^gamma`` of ``p = softmax(logits)``; (N, K) -> (N,).

    ``M`` is clipped to ``K``. Computed in float64 with ``1 - p_max`` taken as the sum of the
    other probabilities, so a confident prediction does not round ``1 - p_max`` to 0 (with
    ``gamma = 0.1``, ``(1e-9)^gamma = 0.13`` still matters). Returned in the dtype of ``logits``.
    """
    p = logits.double().softmax(1).sort(dim=1, descending=True).values  # (N, K)
    top = p[:, : min(top_m, p.shape[1])]  # (N, M)
    complement = torch.cat([p[:, 1:].sum(1, keepdim=True), 1 - top[:, 1:]], dim=1)  # (N, M) 1 - p_j
    return (top**gamma * complement**gamma).sum(1).to(logits.dtype)


class GEN(TensorStateDetector):
    """Generalized entropy score; larger = more anomalous.

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023; OpenOOD v1.5 ``openood/postprocessors/gen_postprocessor.py``
    (``gamma: 0.1``, ``M: 100`` in ``configs/postprocessors/gen.yml``) returns ``-G``:

    ``score(x) = G_gamma(p) = sum_{j in top-M} p_j^gamma (1 - p_j)^gamma``, ``p = softmax(l(x))``.

    Needs no fit (a saved file holds its hyperparameters only). Unlike OpenOOD, which evaluates
    this in float32 (where ``1 - p_max`` is 0 as soon as ``p_max > 1 - 6e-8``, dropping the top
    class's term), we compute it in float64 with ``1 - p_max = sum_{j != max} p_j`` (see
    :func:`generalized_entropy`).

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C, H, W) -> logits (N, K).
    gamma : float, default 0.1
        Exponent of the generalized entropy, > 0 (OpenOOD sweeps 0.01 to 10).
    top_m : int, default 100
        ``M``: number of largest probabilities summed; clipped to ``K``.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> GEN(model).score(torch.rand(5, 1, 8, 8)).shape
    torch.Size([5])
    """

    requires_fit: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, gamma: float = 0.1, top_m: int = 100) -> None:
        super().__init__(model)
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0; got {gamma}")
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1; got {top_m}")
        self.gamma = gamma
        self.top_m = top_m

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Scores (N,) from logits (N, K); ``feats`` is unused."""
        return warn_nonfinite(generalized_entropy(logits, self.gamma, self.top_m), ~torch.isfinite(logits).all(1))
