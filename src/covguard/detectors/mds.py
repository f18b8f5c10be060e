"""MDS: Mahalanobis distance to class means with a tied covariance (Lee et al., 2018).

Also home of the helpers the penultimate-feature baselines share (RMDS, KNN, ViM, ReAct):
flattening the pooled features and squared Mahalanobis distances through a whitening matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from covguard.detectors.base import check_is_fitted, warn_nonfinite
from covguard.detectors.labels import check_labels
from covguard.detectors.state import StateSpec, TensorStateDetector
from covguard.compact_stats import TiedMoments

__all__ = ["MDS", "penultimate_features", "sq_distances", "whitening"]


def penultimate_features(feats: dict[str, Tensor], layer: str, channels: int | None = None) -> Tensor:
    """The output of ``layer`` as a matrix (N, C).

    Parameters
    ----------
    feats : dict of str to Tensor
        Captured outputs; ``feats[layer]`` of shape (N, C) or (N, C, 1, 1).
    layer : str
        Name of the pooled penultimate layer.
    channels : int, optional
        Expected ``C`` (as at fit time).

    Raises
    ------
    ValueError
        If the output has another shape or another number of channels.
    """
    f = feats[layer]
    if f.ndim == 4 and f.shape[2:] == (1, 1):
        f = f.flatten(1)  # (N, C, 1, 1) -> (N, C)
    elif f.ndim != 2:
        raise ValueError(
            f"feature_layer {layer!r} must output pooled penultimate features (N, C) or (N, C, 1, 1); "
            f"got shape {tuple(f.shape)}"
        )
    if channels is not None and f.shape[1] != channels:
        raise ValueError(f"feature_layer {layer!r} must have C={channels} channels (as at fit); got {f.shape[1]}")
    return f


def whitening(cov: Tensor) -> Tensor:
    """Matrix ``A`` (C, r) with ``A A^T = pinvh(cov)``, so ``d2(x) = ||(x - mu) A||^2``.

    Eigenvalues at or below ``max|l| * C * eps`` are dropped, the cutoff of
    ``scipy.linalg.pinvh`` (which ``sklearn.covariance.EmpiricalCovariance.precision_`` uses).

    Parameters
    ----------
    cov : Tensor of shape (C, C)
        Symmetric positive semi-definite, float64.

    Returns
    -------
    Tensor of shape (C, r)
    """
    evals, evecs = torch.linalg.eigh(cov)  # ascending; (C,), (C, C)
    cutoff = evals.abs().max() * cov.shape[-1] * torch.finfo(cov.dtype).eps
    keep = evals > cutoff
    return evecs[:, keep] * evals[keep].rsqrt()  # (C, r)


def sq_distances(z: Tensor, means: Tensor, *, chunk_elements: int = 2**22) -> Tensor:
    """Squared Euclidean distances of whitened rows to whitened means, by explicit differences.

    Parameters
    ----------
    z : Tensor of shape (N, r)
    means : Tensor of shape (K, r)
    chunk_elements : int
        Upper bound on the (N, K_chunk, r) differences formed at once.

    Returns
    -------
    Tensor of shape (N, K)
    """
    step = max(1, chunk_elements // max(1, z.shape[0] * z.shape[1]))
    out = [((z[:, None, :] - means[None, k : k + step]) ** 2).sum(-1) for k in range(0, means.shape[0], step)]  # (N, k_chunk)
    return torch.cat(out, dim=1)


class MDS(TensorStateDetector):
    """Minimum squared Mahalanobis distance of the penultimate features to the class means.

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018, without input preprocessing or layer ensemble, as in
    OpenOOD v1.5 ``openood/postprocessors/mds_postprocessor.py``: class means ``mu_k`` of the
    fit features, one tied covariance ``S`` (``EmpiricalCovariance`` of the class-centered
    features, i.e. within-class scatter / N), precision by ``pinvh``, and

    ``score(x) = min_k (f(x) - mu_k)^T pinvh(S) (f(x) - mu_k)`` (squared distances),

    the negation of OpenOOD's ``max_k -d2_k``. The statistics stream in float64
    (:class:`TiedMoments`); no features are stored.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C_in, H, W) -> logits (N, K).
    feature_layer : str, default "avgpool"
        Module whose output (N, C) or (N, C, 1, 1) are the penultimate features.

    Notes
    -----
    Fit needs labels: the loader yields ``(x, y)``. A class without fit samples has no mean; it
    is left out of the minimum, with a warning. Saved state (:mod:`covguard.detectors.state`):
    ``whitening`` (C, r), ``means`` (K', r) float64 and ``classes`` (K',) int64, the labels of
    the fitted classes.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> x, y = torch.rand(64, 1, 8, 8), torch.arange(64) % 2
    >>> det = MDS(model, feature_layer="2").fit([(x, y)], progress=False)
    >>> det.score(x[:5]).shape
    torch.Size([5])
    """

    state_spec: ClassVar[StateSpec] = {
        "whitening": (torch.float64, ("C", "r")),
        "means": (torch.float64, ("K'", "r")),
        "classes": (torch.int64, ("K'",)),
    }

    def __init__(self, model: nn.Module, *, feature_layer: str = "avgpool") -> None:
        super().__init__(model, layers=[feature_layer])
        self.feature_layer = feature_layer
        self.channels_: int | None = None
        self.means_: Tensor | None = None  # (K', r) whitened class means of the fitted classes
        self.whitening_: Tensor | None = None  # (C, r)
        self.classes_: Tensor | None = None  # (K',) labels of the classes that had fit samples
        self._acc: TiedMoments | None = None

    def _fit_begin(self) -> None:
        self._acc, self.channels_ = None, None

    def _fit_batch(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> None:
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        y = check_labels(y, logits, type(self).__name__)
        if self._acc is None:
            self.channels_ = f.shape[1]
            self._acc = TiedMoments(logits.shape[1], f.shape[1], device=f.device)
        self._acc.update(f, y)

    def _fit_end(self) -> None:
        present = (self._acc.n > 0).nonzero().flatten()  # (K',)
        if len(present) < len(self._acc.n):
            missing = (self._acc.n == 0).nonzero().flatten().tolist()
            warnings.warn(f"classes {missing} have no fit samples; they are left out of the score", RuntimeWarning, stacklevel=4)
        tied = self._acc.within / self._acc.n.sum()  # (C, C) within-class covariance
        self.whitening_ = whitening(tied)  # (C, r)
        self.means_ = self._acc.mean[present] @ self.whitening_  # (K', r)
        self.classes_ = present
        self._acc = None

    def _state(self) -> dict[str, Tensor]:
        return {"whitening": self.whitening_, "means": self.means_, "classes": self.classes_}

    def _install_state(self, tensors: dict[str, Tensor], dims: dict[str, int]) -> None:
        self.whitening_, self.means_, self.classes_ = tensors["whitening"], tensors["means"], tensors["classes"]
        self.channels_ = dims["C"]

    @classmethod
    def _check_state_values(cls, tensors: Mapping[str, Tensor], dims: dict[str, int]) -> None:
        if dims["r"] > dims["C"]:
            raise ValueError(f"tensor 'whitening' has {dims['r']} columns, more than its C={dims['C']} rows")
        labels = tensors["classes"]
        if labels[0] < 0 or not (labels[1:] > labels[:-1]).all():
            raise ValueError(f"tensor 'classes' must hold increasing labels >= 0; got {labels.tolist()[:10]}")

    def check_model(self, classes: int) -> None:
        """Refuse a model with fewer classes than the fitted labels need."""
        if int(self.classes_[-1]) >= classes:
            raise ValueError(f"it has {classes} classes, the detector has means of labels up to {int(self.classes_[-1])}")

    def class_sq_distances(self, f: Tensor) -> Tensor:
        """Squared Mahalanobis distance of features (N, C) to every fitted class mean, (N, K') float64."""
        return sq_distances(f.double() @ self.whitening_.to(f.device), self.means_.to(f.device))

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """``min_k`` squared Mahalanobis distance (N,) from the features of ``feature_layer``."""
        check_is_fitted(self)
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        scores = self.class_sq_distances(f).amin(1).to(f.dtype)
        return warn_nonfinite(scores, ~torch.isfinite(f).all(1))
