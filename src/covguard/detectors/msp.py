"""MSP: the negated maximum softmax probability (Hendrycks & Gimpel, 2017)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from covguard.detectors.base import warn_nonfinite
from covguard.detectors.state import TensorStateDetector

__all__ = ["MSP", "msp_score"]


def msp_score(logits: Tensor) -> Tensor:
    """``-max_k softmax(logits)_k``; logits (N, K) -> (N,)."""
    return -logits.softmax(1).amax(1)


class MSP(TensorStateDetector):
    """Maximum softmax probability baseline, negated so that larger = more anomalous.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks", ICLR 2017; OpenOOD v1.5
    ``openood/postprocessors/base_postprocessor.py`` returns ``conf = max_k softmax_k``:

    ``score(x) = -max_k softmax(l(x))_k``, in [-1, -1/K].

    Needs no fit; a saved file holds its hyperparameters only.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C, H, W) -> logits (N, K).

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> MSP(model).score(torch.rand(5, 1, 8, 8)).shape
    torch.Size([5])
    """

    requires_fit: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Scores (N,) from logits (N, K); ``feats`` is unused."""
        return warn_nonfinite(msp_score(logits), ~torch.isfinite(logits).all(1))
