"""Validation of the class labels a detector is fitted with."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_labels"]


def check_labels(y: Tensor | None, logits: Tensor, detector: str) -> Tensor:
    """Validate integer labels (N,) against logits (N, K); returns them as int64.

    Parameters
    ----------
    y : Tensor of shape (N,) or None
    logits : Tensor of shape (N, K)
    detector : str
        What needs the labels, for the message.
    """
    if y is None:
        raise ValueError(f"{detector} needs labels: the loader must yield (x, y) batches")
    N, K = logits.shape
    if y.ndim != 1 or y.shape[0] != N or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be integer class labels of shape ({N},); got {y.dtype} {tuple(y.shape)}")
    if y.min() < 0 or y.max() >= K:
        raise ValueError(f"y must hold labels in [0, {K - 1}] (the model has {K} outputs); got range [{y.min()}, {y.max()}]")
    return y.long()
