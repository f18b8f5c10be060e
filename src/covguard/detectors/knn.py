"""KNN: distance to the k-th nearest fit feature after L2 normalization (Sun et al., 2022)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covguard.detectors.base import check_is_fitted, warn_nonfinite
from covguard.detectors.mds import penultimate_features
from covguard.detectors.state import StateSpec, TensorStateDetector

__all__ = ["KNN", "kth_neighbor_distance"]


def kth_neighbor_distance(q: Tensor, bank: Tensor, k: int, *, chunk: int = 16384) -> Tensor:
    """Euclidean distance of each query to its ``k``-th nearest row of ``bank``.

    The bank is scanned in chunks of rows (``torch.cdist`` then ``topk``), so memory stays
    ``N x (k + chunk)``.

    Parameters
    ----------
    q : Tensor of shape (N, C)
    bank : Tensor of shape (M, C), with M >= k
    k : int

    Returns
    -------
    Tensor of shape (N,)
    """
    best = q.new_empty(q.shape[0], 0)
    for start in range(0, bank.shape[0], chunk):
        d = torch.cat([best, torch.cdist(q, bank[start : start + chunk])], dim=1)  # (N, k' + chunk)
        best = d.topk(min(k, d.shape[1]), dim=1, largest=False).values  # ascending
    return best[:, k - 1]


class KNN(TensorStateDetector):
    """Distance to the ``k``-th nearest neighbour among the normalized fit features.

    Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022, as in
    OpenOOD v1.5 ``openood/postprocessors/knn_postprocessor.py`` (``K: 50`` in
    ``configs/postprocessors/knn.yml``):

    ``score(x) = || z(x) - z_(k)(x) ||``, ``z = f / ||f||``,

    where ``z_(k)(x)`` is the ``k``-th nearest normalized fit feature. OpenOOD returns the
    negated *squared* distance (faiss ``IndexFlatL2``); the ranking is the same.

    The detector necessarily stores the normalized fit features (M, C) in float32, on the
    model's device: M x C x 4 bytes (100 MB for 50 000 x 512). Search is exact, by chunked
    ``torch.cdist`` + ``topk`` (no faiss).

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C_in, H, W) -> logits (N, K).
    k : int, default 50
        Neighbour rank; clipped to the number of fit images, with a warning.
    feature_layer : str, default "avgpool"
        Module whose output (N, C) or (N, C, 1, 1) are the penultimate features.

    Notes
    -----
    OpenOOD normalizes as ``f / ||f|| + 1e-10``; we use ``f / max(||f||, 1e-12)``
    (``F.normalize``), which differs by 1e-10 per coordinate and keeps zero features finite.
    A fit image scored again finds itself at distance 0 as its first neighbour, as in OpenOOD.
    Saved state (:mod:`covguard.detectors.state`): ``bank`` (M, C) float32.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> x = torch.rand(64, 1, 8, 8)
    >>> det = KNN(model, k=5, feature_layer="2").fit([x], progress=False)
    >>> det.score(x[:5]).shape
    torch.Size([5])
    """

    state_spec: ClassVar[StateSpec] = {"bank": (torch.float32, ("M", "C"))}

    def __init__(self, model: nn.Module, *, k: int = 50, feature_layer: str = "avgpool") -> None:
        super().__init__(model, layers=[feature_layer])
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        self.k = k
        self.feature_layer = feature_layer
        self.k_: int | None = None
        self.channels_: int | None = None
        self.bank_: Tensor | None = None  # (M, C) float32, L2-normalized fit features
        self._chunks: list[Tensor] = []

    def _fit_begin(self) -> None:
        self._chunks, self.channels_, self.bank_ = [], None, None

    def _fit_batch(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> None:
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        self.channels_ = f.shape[1]
        self._chunks.append(F.normalize(f.float(), dim=1))

    def _fit_end(self) -> None:
        self.bank_ = torch.cat(self._chunks)  # (M, C)
        self._chunks = []
        self.k_ = self._clipped_k(stacklevel=5)

    def _clipped_k(self, *, stacklevel: int) -> int:
        """``k`` clipped to the bank size, with a warning when it was larger."""
        k = min(self.k, self.bank_.shape[0])
        if k < self.k:
            warnings.warn(f"k={self.k} exceeds the {self.bank_.shape[0]} fit images; using k={k}", RuntimeWarning, stacklevel=stacklevel)
        return k

    def with_k(self, k: int) -> KNN:
        """A fitted copy that scores with the ``k``-th neighbour, sharing this detector's bank (no refit).

        Parameters
        ----------
        k : int
            Neighbour rank, >= 1; clipped to the number of fit images, with a warning.

        Returns
        -------
        KNN
            Equal to a ``KNN(k=k)`` fitted on the same data; the bank tensor is shared, not copied.
        """
        check_is_fitted(self)
        other = self.clone(k=k)
        other.channels_, other.bank_, other.input_shape_ = self.channels_, self.bank_, self.input_shape_
        other.k_ = other._clipped_k(stacklevel=3)
        other.fitted_ = True
        return other

    def _state(self) -> dict[str, Tensor]:
        return {"bank": self.bank_}

    def _install_state(self, tensors: dict[str, Tensor], dims: dict[str, int]) -> None:
        self.bank_, self.channels_ = tensors["bank"], dims["C"]
        self.k_ = min(self.k, dims["M"])

    @classmethod
    def _check_state_values(cls, tensors: Mapping[str, Tensor], dims: dict[str, int]) -> None:
        norms = tensors["bank"].double().norm(dim=1)  # (M,) 1, or 0 for a zero feature
        if not ((norms - 1).abs() < 1e-4).logical_or(norms == 0).all():
            raise ValueError("tensor 'bank' must hold L2-normalized rows (norm 1, or 0 for a zero feature)")

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Distance (N,) to the ``k``-th nearest normalized fit feature."""
        check_is_fitted(self)
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        bad = ~torch.isfinite(f).all(1)
        z = F.normalize(f.float().masked_fill(bad[:, None], 0.0), dim=1).to(self.bank_.device)
        scores = kth_neighbor_distance(z, self.bank_, self.k_).to(device=f.device, dtype=f.dtype)
        return warn_nonfinite(scores, bad)
