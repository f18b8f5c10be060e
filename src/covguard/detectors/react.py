"""ReAct: clip the penultimate activations, then score the recomputed logits by energy (Sun et al., 2021)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from covguard.detectors.base import check_is_fitted, warn_nonfinite
from covguard.detectors.mds import penultimate_features
from covguard.detectors.state import StateSpec, TensorStateDetector
from covguard.detectors.vim import linear_head

__all__ = ["ReAct", "percentile"]


def percentile(values: Tensor, q: float) -> float:
    """The ``q``-th percentile of all entries, with linear interpolation (``np.percentile``'s default).

    Parameters
    ----------
    values : Tensor of any shape
    q : float
        In [0, 100].
    """
    v = values.flatten().double().sort().values  # (M,)
    pos = q / 100 * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (pos - lo) * (v[hi] - v[lo]))


class ReAct(TensorStateDetector):
    """Energy score after clipping the penultimate activations.

    Sun et al., "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021,
    as in OpenOOD v1.5 ``openood/postprocessors/react_postprocessor.py`` (``percentile: 90`` in
    ``configs/postprocessors/react.yml``): the threshold ``c`` is the ``percentile``-th
    percentile of all fit activations (every image, every unit, pooled into one list), and

    ``score(x) = -logsumexp_k fc(min(f(x), c))_k``,

    the negation of OpenOOD's energy confidence (temperature 1).

    The fit activations are stored during fit (M x C float32 on the CPU) to take the exact
    percentile, then dropped; only ``threshold_`` is kept.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C_in, H, W) -> logits (N, K).
    percentile : float, default 90
        Percentile of the fit activations used as the clipping threshold, in (0, 100].
    feature_layer : str, default "avgpool"
        Module whose output (N, C) or (N, C, 1, 1) are the penultimate features.
    fc_layer : str, default "fc"
        The final ``nn.Linear`` applied to the clipped features (``"linear"`` for the CIFAR
        ResNet-20/32/44); its current weights are used at every call.

    Notes
    -----
    OpenOOD fits the threshold on the in-distribution *validation* split; here it is fitted on
    whatever loader is given to :meth:`fit`. The recomputed logits are ``fc(clip(f))``, so the
    model must apply ``fc_layer`` directly to the flattened ``feature_layer`` output. Saved state
    (:mod:`covguard.detectors.state`): ``threshold``, a 0-d float64 tensor.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> x = torch.rand(64, 1, 8, 8)
    >>> det = ReAct(model, feature_layer="2", fc_layer="4").fit([x], progress=False)
    >>> det.score(x[:5]).shape
    torch.Size([5])
    """

    state_spec: ClassVar[StateSpec] = {"threshold": (torch.float64, ())}

    def __init__(
        self, model: nn.Module, *, percentile: float = 90.0, feature_layer: str = "avgpool", fc_layer: str = "fc"
    ) -> None:
        super().__init__(model, layers=[feature_layer])
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100]; got {percentile}")
        linear_head(model, fc_layer)
        self.percentile = percentile
        self.feature_layer = feature_layer
        self.fc_layer = fc_layer
        self.channels_: int | None = None
        self.threshold_: float | None = None
        self._chunks: list[Tensor] = []

    def _fit_begin(self) -> None:
        self._chunks, self.channels_, self.threshold_ = [], None, None

    def _fit_batch(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> None:
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        head = linear_head(self.model, self.fc_layer)
        if f.shape[1] != head.in_features:
            raise ValueError(
                f"fc_layer {self.fc_layer!r} takes {head.in_features} inputs but feature_layer {self.feature_layer!r} gives C={f.shape[1]}"
            )
        self.channels_ = f.shape[1]
        self._chunks.append(f.float().cpu())

    def _fit_end(self) -> None:
        self.threshold_ = percentile(torch.cat(self._chunks), self.percentile)
        self._chunks = []

    def _state(self) -> dict[str, Tensor]:
        return {"threshold": torch.tensor(self.threshold_, dtype=torch.float64)}

    def _install_state(self, tensors: dict[str, Tensor], dims: dict[str, int]) -> None:
        self.threshold_ = float(tensors["threshold"])
        self.channels_ = linear_head(self.model, self.fc_layer).in_features  # fit checked C = in_features

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Negative energy of the logits recomputed from clipped features, shape (N,)."""
        check_is_fitted(self)
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        clipped_logits = linear_head(self.model, self.fc_layer)(f.clamp(max=self.threshold_))  # (N, K)
        scores = -clipped_logits.logsumexp(1)
        return warn_nonfinite(scores, ~torch.isfinite(f).all(1))
