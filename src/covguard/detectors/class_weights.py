"""How each image weights the groups of a patch detector: at fit (which statistics it feeds) and
at score (which Gaussians its patches are measured against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from covguard.detectors.labels import check_labels

__all__ = ["CLASS_WEIGHTS", "SCORINGS", "ClassWeighting", "SharedGroup"]

CLASS_WEIGHTS = ("label", "probs", "correct")
SCORINGS = ("top1", "mixture")


class SharedGroup:
    """One group for every image: a shared mean and covariance."""

    def n_groups(self, logits: Tensor) -> int:
        return 1

    def at_fit(self, logits: Tensor, y: Tensor | None) -> None:
        return None

    def at_score(self, logits: Tensor) -> None:
        return None


class ClassWeighting:
    """One group per class of the model.

    Parameters
    ----------
    class_weights : {"label", "probs", "correct"}
        At fit, each image feeds class ``k`` with weight: its one-hot label; the model's
        predicted probabilities; its one-hot label only when the model classifies it correctly.
    scoring : {"top1", "mixture"}
        At score, each image is measured against its predicted class, or against the ``top_m``
        most probable classes weighted by their renormalized probabilities.
    top_m : int
    """

    def __init__(self, class_weights: str, scoring: str, top_m: int) -> None:
        self.class_weights, self.scoring, self.top_m = class_weights, scoring, top_m

    def n_groups(self, logits: Tensor) -> int:
        return logits.shape[1]

    def at_fit(self, logits: Tensor, y: Tensor | None) -> Tensor:
        """Per-image class weights (N, K) at fit."""
        if self.class_weights == "probs":
            return logits.double().softmax(1).to(logits.dtype)
        y = check_labels(y, logits, f"class_weights={self.class_weights!r}")
        w = F.one_hot(y, logits.shape[1]).to(logits.dtype)  # (N, K)
        if self.class_weights == "correct":
            w = w * (logits.argmax(1) == y)[:, None]
        return w

    def at_score(self, logits: Tensor) -> Tensor:
        """(N, K): one-hot predicted class (``top1``) or renormalized top-``m`` probabilities."""
        if self.scoring == "top1":
            return F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
        probs = logits.softmax(1)  # (N, K)
        top_p, top_k = probs.topk(min(self.top_m, probs.shape[1]), dim=1)  # (N, m)
        return torch.zeros_like(probs).scatter_(1, top_k, top_p / top_p.sum(1, keepdim=True))
