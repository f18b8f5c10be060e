"""Class patch Mahalanobis: class-conditional patch Gaussians, weighted by the model's own beliefs."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covguard.detectors.patch import PatchMahalanobis
from covguard.stats import Moments

__all__ = ["ClassMahalanobis", "CLASS_WEIGHTS", "SCORINGS"]


CLASS_WEIGHTS = ("label", "probs", "correct")
SCORINGS = ("top1", "mixture")


class ClassMahalanobis(PatchMahalanobis):
    """Class-conditional patch Mahalanobis distances.

    Fit: the patch moments of each class ``k`` weight each image by ``w_k``: its one-hot label
    (``"label"``), the model's predicted probabilities (``"probs"``), or its one-hot label only
    when the model classifies it correctly (``"correct"``, as the original authors did).
    A class left with no weight falls back to the pooled statistics of all classes, with a warning.

    Score: per patch, ``top1`` takes the distance to the predicted class; ``mixture`` takes
    ``sum_k pi_k d2_k`` over the ``top_m`` most probable classes (probabilities renormalized
    over them). Then the map is aggregated as in :class:`SimpleMahalanobis`.

    Parameters
    ----------
    class_weights : {"label", "probs", "correct"}
    scoring : {"top1", "mixture"}
    top_m : int
        Classes mixed by ``"mixture"``.
    **kwargs
        As :class:`~covguard.detectors.patch.PatchMahalanobis`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Iterable[str],
        class_weights: str = "label",
        scoring: str = "top1",
        top_m: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, layers=layers, **kwargs)
        if class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}; got {class_weights!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}; got {scoring!r}")
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1; got {top_m}")
        self.class_weights = class_weights
        self.scoring = scoring
        self.top_m = top_m
        self.empty_classes_: dict[str, list[int]] = {}

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "class_weights": self.class_weights, "scoring": self.scoring, "top_m": self.top_m}

    def _n_groups(self, logits: Tensor) -> int:
        return logits.shape[1]

    def _weights(self, logits: Tensor, y: Tensor | None) -> Tensor:
        K = logits.shape[1]
        if self.class_weights == "probs":
            return logits.double().softmax(1).to(logits.dtype)
        if y is None:
            raise ValueError(f"class_weights={self.class_weights!r} needs labels: the loader must yield (x, y) batches")
        if y.ndim != 1 or y.shape[0] != logits.shape[0] or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be integer class labels of shape ({logits.shape[0]},); got {y.dtype} {tuple(y.shape)}")
        if y.min() < 0 or y.max() >= K:
            raise ValueError(f"y must hold labels in [0, {K - 1}] (the model has {K} outputs); got range [{y.min()}, {y.max()}]")
        w = F.one_hot(y.long(), K).to(logits.dtype)  # (N, K)
        if self.class_weights == "correct":
            w = w * (logits.argmax(1) == y)[:, None]
        return w

    def _fit_begin(self) -> None:
        super()._fit_begin()
        self.empty_classes_ = {}

    def _finalize_moments(self, layer: str, moments: Moments) -> Moments:
        empty = (moments.n <= 0).nonzero().flatten()
        if len(empty) == 0:
            return moments
        if len(empty) == moments.n_groups:
            raise ValueError(
                f"no class received any weight at layer {layer!r} (class_weights={self.class_weights!r}); "
                "with 'correct', the model classified no fit image correctly"
            )
        self.empty_classes_[layer] = empty.tolist()
        warnings.warn(
            f"classes {empty.tolist()} have no fit samples at layer {layer!r}; they use the pooled statistics of all classes",
            RuntimeWarning,
            stacklevel=4,
        )
        pooled = moments.pooled()
        n, mean, scatter = moments.n.clone(), moments.mean.clone(), moments.scatter.clone()
        n[empty], mean[empty], scatter[empty] = pooled.n, pooled.mean, pooled.scatter
        return Moments(n, mean, scatter)

    def _group_weights(self, logits: Tensor) -> Tensor:
        """(N, K): one-hot predicted class (``top1``) or renormalized top-``m`` probabilities."""
        if self.scoring == "top1":
            return F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
        probs = logits.softmax(1)  # (N, K)
        top_p, top_k = probs.topk(min(self.top_m, probs.shape[1]), dim=1)  # (N, m)
        return torch.zeros_like(probs).scatter_(1, top_k, top_p / top_p.sum(1, keepdim=True))
