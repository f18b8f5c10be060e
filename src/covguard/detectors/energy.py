"""Energy: the free energy of the logits (Liu et al., 2020)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from covguard.detectors.base import warn_nonfinite
from covguard.detectors.state import TensorStateDetector

__all__ = ["Energy", "energy_score"]


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``-T logsumexp(logits / T)``; logits (N, K) -> (N,)."""
    return -temperature * (logits / temperature).logsumexp(1)


class Energy(TensorStateDetector):
    """Energy score; larger (less negative) energy = more anomalous.

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020; OpenOOD v1.5
    ``openood/postprocessors/ebo_postprocessor.py`` returns ``conf = T logsumexp(l / T)``:

    ``score(x) = -T logsumexp_k(l(x)_k / T)``.

    Needs no fit; a saved file holds its hyperparameters only.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C, H, W) -> logits (N, K).
    temperature : float, default 1
        ``T`` (OpenOOD's ``configs/postprocessors/ebo.yml`` uses 1).

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> Energy(model).score(torch.rand(5, 1, 8, 8)).shape
    torch.Size([5])
    """

    requires_fit: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, temperature: float = 1.0) -> None:
        super().__init__(model)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.temperature = temperature

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Scores (N,) from logits (N, K); ``feats`` is unused."""
        return warn_nonfinite(energy_score(logits, self.temperature), ~torch.isfinite(logits).all(1))
