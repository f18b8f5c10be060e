"""Simple patch Mahalanobis: one shared mean and covariance of the patch vectors per layer."""

from __future__ import annotations

from covguard.detectors.patch import PatchMahalanobis

__all__ = ["SimpleMahalanobis"]


class SimpleMahalanobis(PatchMahalanobis):
    """Squared Mahalanobis distance of every ``k x k`` feature-map patch to one Gaussian per layer.

    Larger score = more anomalous. See :class:`~covguard.detectors.patch.PatchMahalanobis` for
    the parameters.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> x = torch.rand(64, 1, 8, 8)
    >>> det = SimpleMahalanobis(model, layers=["1"]).fit([x[:32], x[32:]], progress=False)
    >>> det.score(x[:5]).shape
    torch.Size([5])
    >>> det.distance_maps(x[:5])["1"].shape
    torch.Size([5, 6, 6])
    """
