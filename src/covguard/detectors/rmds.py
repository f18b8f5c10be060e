"""RMDS: relative Mahalanobis distance, class Gaussians minus one background Gaussian (Ren et al., 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from covguard.detectors.base import check_is_fitted, warn_nonfinite
from covguard.detectors.mds import MDS, penultimate_features, sq_distances, whitening
from covguard.detectors.state import StateSpec

__all__ = ["RMDS"]


class RMDS(MDS):
    """Relative Mahalanobis distance of the penultimate features.

    Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection",
    arXiv:2106.09022 (2021), as in OpenOOD v1.5 ``openood/postprocessors/rmds_postprocessor.py``.
    The class Gaussians are those of :class:`~covguard.detectors.mds.MDS` (class means, tied
    covariance); the background Gaussian has the mean ``mu_0`` and covariance ``S_0`` of all fit
    features, ignoring labels. With squared distances ``d2_k`` and ``d2_0``:

    ``score(x) = min_k (d2_k(x) - d2_0(x)) = min_k d2_k(x) - d2_0(x)``,

    the negation of OpenOOD's ``max_k (-d2_k + d2_0)``. Both covariances come from the same
    streamed float64 moments (background scatter = within-class + between-class scatter).

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C_in, H, W) -> logits (N, K).
    feature_layer : str, default "avgpool"
        Module whose output (N, C) or (N, C, 1, 1) are the penultimate features.

    Notes
    -----
    Fit needs labels, as :class:`MDS`. Saved state: that of :class:`MDS` plus
    ``background_whitening`` (C, r0) and ``background_mean`` (1, r0), float64.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> x, y = torch.rand(64, 1, 8, 8), torch.arange(64) % 2
    >>> det = RMDS(model, feature_layer="2").fit([(x, y)], progress=False)
    >>> det.score(x[:5]).shape
    torch.Size([5])
    """

    state_spec: ClassVar[StateSpec] = {
        **MDS.state_spec,
        "background_whitening": (torch.float64, ("C", "r0")),
        "background_mean": (torch.float64, (1, "r0")),
    }

    def __init__(self, model: nn.Module, *, feature_layer: str = "avgpool") -> None:
        super().__init__(model, feature_layer=feature_layer)
        self.background_whitening_: Tensor | None = None  # (C, r0)
        self.background_mean_: Tensor | None = None  # (1, r0) whitened

    def _fit_end(self) -> None:
        mean, scatter = self._acc.total()  # all fit features, labels ignored: (C,), (C, C)
        self.background_whitening_ = whitening(scatter / self._acc.n.sum())  # (C, r0)
        self.background_mean_ = mean[None] @ self.background_whitening_  # (1, r0)
        super()._fit_end()

    def _state(self) -> dict[str, Tensor]:
        return {**super()._state(), "background_whitening": self.background_whitening_, "background_mean": self.background_mean_}

    def _install_state(self, tensors: dict[str, Tensor], dims: dict[str, int]) -> None:
        super()._install_state(tensors, dims)
        self.background_whitening_, self.background_mean_ = tensors["background_whitening"], tensors["background_mean"]

    @classmethod
    def _check_state_values(cls, tensors: Mapping[str, Tensor], dims: dict[str, int]) -> None:
        super()._check_state_values(tensors, dims)
        if dims["r0"] > dims["C"]:
            raise ValueError(f"tensor 'background_whitening' has {dims['r0']} columns, more than its C={dims['C']} rows")

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """``min_k d2_k - d2_0`` (N,) from the features of ``feature_layer``."""
        check_is_fitted(self)
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        z0 = f.double() @ self.background_whitening_.to(f.device)  # (N, r0)
        d2_0 = sq_distances(z0, self.background_mean_.to(f.device))[:, 0]  # (N,)
        scores = (self.class_sq_distances(f).amin(1) - d2_0).to(f.dtype)
        return warn_nonfinite(scores, ~torch.isfinite(f).all(1))
