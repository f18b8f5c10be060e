"""How each image weights the groups of a patch detector: at fit (which statistics it feeds) and
at score (which Gaussians its patches are measured against, regrouped by :class:`GroupRows`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from covguard.detectors.labels import check_labels

__all__ = ["CLASS_WEIGHTS", "SCORINGS", "ClassWeighting", "GroupRows", "SharedGroup", "group_rows"]

CLASS_WEIGHTS = ("label", "probs", "correct")
SCORINGS = ("top1", "mixture")


@dataclass(frozen=True)
class GroupRows:
    """Per-image group weights regrouped by group: which images are measured against each group,
    with which weight. Built once per batch (:func:`group_rows`, one host sync) for every layer.

    Attributes
    ----------
    source : Tensor of shape (N, K) or (N,)
        The weights, or the labels (int) of one-hot weights, it was built from.
    groups : tuple of (k, rows, w)
        Each group that some image weights, ascending ``k``: the indices (n_k,) of those images
        (None: all N) and their weights (n_k, 1, 1) (None: all exactly 1, as labels give them).
    """

    source: Tensor
    groups: tuple[tuple[int, Tensor | None, Tensor | None], ...]

    def subset(self, index: Tensor) -> GroupRows:
        """The groups of the images ``index`` (n,), renumbered 0 .. n-1."""
        return group_rows(self.source[index])


def group_rows(source: Tensor) -> GroupRows:
    """Regroup per-image weights by group (:class:`GroupRows`).

    Parameters
    ----------
    source : Tensor of shape (N, K) or (N,)
        Non-negative weights of each image and group (zero where an image is not measured
        against a group), or each image's one group (int labels: weight 1, multiplications by 1
        skipped).
    """
    labels = source.ndim == 1
    members = enumerate(source.tolist()) if labels else (source > 0).nonzero().tolist()
    rows: dict[int, list[int]] = {}
    for row, k in members:
        rows.setdefault(k, []).append(row)
    groups = []
    for k in sorted(rows):
        index = None if len(rows[k]) == len(source) else torch.tensor(rows[k], device=source.device)  # (n_k,)
        w = None if labels else (source[:, k] if index is None else source[index, k])[:, None, None]
        groups.append((k, index, w))
    return GroupRows(source, tuple(groups))


class SharedGroup:
    """One group for every image: a shared mean and covariance."""

    def n_groups(self, logits: Tensor) -> int:
        return 1

    def at_fit(self, logits: Tensor, y: Tensor | None) -> None:
        return None

    def at_score(self, logits: Tensor) -> None:
        return None

    def score_groups(self, logits: Tensor) -> None:
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

    def score_groups(self, logits: Tensor) -> GroupRows:
        """:meth:`at_score` regrouped by class (:func:`group_rows`); top-1 from the predicted classes."""
        return group_rows(logits.argmax(1) if self.scoring == "top1" else self.at_score(logits))
