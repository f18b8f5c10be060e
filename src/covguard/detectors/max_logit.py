"""MaxLogit: the negated largest logit (Hendrycks et al., 2022)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from covguard.detectors.base import warn_nonfinite
from covguard.detectors.state import TensorStateDetector

__all__ = ["MaxLogit", "max_logit_score"]


def max_logit_score(logits: Tensor) -> Tensor:
    """``-max_k logits_k``; logits (N, K) -> (N,)."""
    return -logits.amax(1)


class MaxLogit(TensorStateDetector):
    """Maximum logit baseline, negated so that larger = more anomalous.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
    ICML 2022; OpenOOD v1.5 ``openood/postprocessors/maxlogit_postprocessor.py`` returns
    ``conf = max_k l_k``:

    ``score(x) = -max_k l(x)_k``.

    Needs no fit; a saved file holds its hyperparameters only.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C, H, W) -> logits (N, K).

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> MaxLogit(model).score(torch.rand(5, 1, 8, 8)).shape
    torch.Size([5])
    """

    requires_fit: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Scores (N,) from logits (N, K); ``feats`` is unused."""
        return warn_nonfinite(max_logit_score(logits), ~torch.isfinite(logits).all(1))
