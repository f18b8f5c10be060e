"""Held-out Gaussian log-likelihood of a patch detector: compares covariance estimates without OOD data."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from covguard.detectors.base import check_is_fitted
from covguard.detectors.patch import PatchMahalanobis

__all__ = ["log_likelihood"]


@torch.no_grad()
def log_likelihood(detector: PatchMahalanobis, x: Tensor) -> Tensor:
    """Mean Gaussian log-density of the patches of each image under the fitted model, per dimension.

    ``-(mean_patches d2 + D log 2 pi - logdet P) / (2 D)`` for each layer, with the precision
    ``P`` of the group each patch is scored against (weighted like the distances for
    class detectors). Averaged over held-out in-distribution images, it compares covariance
    estimates of the same statistics without any out-of-distribution data.

    Parameters
    ----------
    detector : PatchMahalanobis
        A fitted Simple or Class detector.
    x : Tensor of shape (N, C, H, W)

    Returns
    -------
    Tensor of shape (N, L), float64

    Raises
    ------
    ValueError
        For relative distances (a difference of two squared distances is no density).
    """
    check_is_fitted(detector)
    if detector.relative_distances:
        raise ValueError("log_likelihood needs absolute distances; the detector scores relative ones (relative=True)")
    logits, feats = detector.forward(x)
    maps = detector.distance_maps_features(logits, feats)
    weights = detector.weighting.at_score(logits)  # (N, K) or None
    cols = []
    for layer in detector.layers:
        form = detector.forms_[layer]
        D = form.mean.shape[1]
        logdet = form.logdet().to(logits.device)  # (K,)
        logdet = logdet[0] if weights is None else weights.double() @ logdet  # () or (N,)
        d2 = maps[layer].double().flatten(1).mean(1)  # (N,)
        cols.append(-(d2 + D * math.log(2 * math.pi) - logdet) / (2 * D))
    return torch.stack(cols, dim=1).cpu()
