"""ViM: virtual-logit matching, the feature residual off the principal subspace as an extra logit (Wang et al., 2022)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from covguard.detectors.base import check_is_fitted, warn_nonfinite
from covguard.detectors.mds import penultimate_features
from covguard.detectors.state import StateSpec, TensorStateDetector
from covguard.stats import StreamingMoments

__all__ = ["ViM", "linear_head"]


def linear_head(model: nn.Module, name: str) -> nn.Linear:
    """The final linear layer ``name`` of ``model``.

    Raises
    ------
    ValueError
        If ``name`` is not a module of the model, or not an ``nn.Linear``.
    """
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise ValueError(f"fc_layer {name!r} is not a module of the model; valid names: {sorted(n for n in modules if n)}")
    if not isinstance(modules[name], nn.Linear):  # a ValueError: the str argument names the wrong module
        kind = type(modules[name]).__name__
        raise ValueError(f"fc_layer {name!r} must be an nn.Linear (the final classifier); got {kind}")  # noqa: TRY004
    return modules[name]


class ViM(TensorStateDetector):
    """Virtual-logit matching score of the penultimate features.

    Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022, as in
    OpenOOD v1.5 ``openood/postprocessors/vim_postprocessor.py``. With the final layer's
    weight ``W`` (K, C) and bias ``b`` (K,), logits ``l = W f + b``:

    - origin ``u = -pinv(W) b``;
    - principal subspace: the top-``dim`` eigenvectors of ``E[(f - u)(f - u)^T]`` over the fit
      set (``EmpiricalCovariance(assume_centered=True)`` on ``f - u`` in OpenOOD); ``R`` (C, C-dim)
      spans the remaining eigenvectors;
    - ``alpha = mean_fit(max_k l_k) / mean_fit(||(f - u) R||)``;
    - ``score(x) = alpha ||(f - u) R|| - logsumexp_k l_k``,

    the negation of OpenOOD's ``-vlogit + energy``; it is ``log(p0 / (1 - p0))`` for the
    paper's virtual-class softmax probability ``p0``, so the ranking is the paper's.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C_in, H, W) -> logits (N, K).
    dim : int, optional
        Dimension of the principal subspace. ``None`` (default) takes ``C // 2``: OpenOOD v1.5
        uses ``dim: 256`` (``configs/postprocessors/vim.yml``) for its ResNet-18's 512-d features
        and the paper sets it by feature size (1000 for 2048-d ResNet-50 features). Values
        ``>= C`` are clipped to ``C - 1``, with a warning.
    feature_layer : str, default "avgpool"
        Module whose output (N, C) or (N, C, 1, 1) are the penultimate features.
    fc_layer : str, default "fc"
        The final ``nn.Linear`` (``"linear"`` for the CIFAR ResNet-20/32/44).

    Notes
    -----
    Fit reads the loader twice (moments, then ``alpha``: ``fit_passes = 2``), so it must be re-iterable; no
    features are stored. The second-moment matrix is formed in float64 from streamed moments:
    ``E[(f - u)(f - u)^T] = S / M + (m - u)(m - u)^T``. ``W`` and ``b`` are copied at fit.
    Saved state (:mod:`covguard.detectors.state`), float64: ``weight`` (K, C), ``bias`` (K,),
    ``origin`` (C,), ``residual_basis`` (C, C - dim) and ``alpha`` (a 0-d tensor).

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    >>> x = torch.rand(64, 1, 8, 8)
    >>> det = ViM(model, feature_layer="2", fc_layer="4").fit([x], progress=False)
    >>> det.score(x[:5]).shape
    torch.Size([5])
    """

    state_spec: ClassVar[StateSpec] = {
        "weight": (torch.float64, ("K", "C")),
        "bias": (torch.float64, ("K",)),
        "origin": (torch.float64, ("C",)),
        "residual_basis": (torch.float64, ("C", "R")),
        "alpha": (torch.float64, ()),
    }

    def __init__(self, model: nn.Module, *, dim: int | None = None, feature_layer: str = "avgpool", fc_layer: str = "fc") -> None:
        super().__init__(model, layers=[feature_layer])
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be >= 1 or None; got {dim}")
        linear_head(model, fc_layer)
        self.dim = dim
        self.feature_layer = feature_layer
        self.fc_layer = fc_layer
        self.channels_: int | None = None
        self.dim_: int | None = None
        self.weight_: Tensor | None = None  # (K, C) float64
        self.bias_: Tensor | None = None  # (K,) float64
        self.origin_: Tensor | None = None  # (C,) u
        self.residual_basis_: Tensor | None = None  # (C, C - dim)
        self.alpha_: float | None = None
        self._acc: StreamingMoments | None = None
        self._max_logit_sum = 0.0

    @property
    def is_fitted(self) -> bool:
        return super().is_fitted and self.alpha_ is not None

    def _logits(self, f: Tensor) -> Tensor:
        """Head logits (N, K) float64 from features (N, C)."""
        return f.double() @ self.weight_.to(f.device).T + self.bias_.to(f.device)

    def _residual_norm(self, f: Tensor) -> Tensor:
        """``||(f - u) R||`` (N,) float64."""
        return ((f.double() - self.origin_.to(f.device)) @ self.residual_basis_.to(f.device)).norm(dim=1)

    #: Pass 1: the moments of the features and the mean max-logit; pass 2: the mean residual norm.
    fit_passes = 2

    def _fit_begin(self) -> None:
        head = linear_head(self.model, self.fc_layer)
        self.weight_ = head.weight.detach().to("cpu", torch.float64, copy=True)
        bias = torch.zeros(head.out_features) if head.bias is None else head.bias.detach()
        self.bias_ = bias.to("cpu", torch.float64, copy=True)
        self._acc, self.channels_, self._max_logit_sum = None, None, 0.0
        self._norm_sum, self._norm_count = 0.0, 0
        self.alpha_ = None

    def _fit_batch(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> None:
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        if self.current_pass == 1:
            norms = self._residual_norm(f)  # (N,)
            self._norm_sum += float(norms.sum())
            self._norm_count += norms.numel()
            return
        if self._acc is None:
            if f.shape[1] != self.weight_.shape[1]:
                raise ValueError(
                    f"fc_layer {self.fc_layer!r} takes {self.weight_.shape[1]} inputs but feature_layer "
                    f"{self.feature_layer!r} gives C={f.shape[1]}"
                )
            if f.shape[1] < 2:
                raise ValueError(f"ViM needs C >= 2 penultimate features; {self.feature_layer!r} gives C={f.shape[1]}")
            self.channels_ = f.shape[1]
            self._acc = StreamingMoments(f.shape[1])
        self._acc.update(f)
        self._max_logit_sum += float(self._logits(f).amax(1).sum())

    def _fit_end_pass(self, index: int) -> None:
        if index > 0:
            return
        C = self.channels_
        self.dim_ = C // 2 if self.dim is None else min(self.dim, C - 1)
        if self.dim is not None and self.dim_ < self.dim:
            warnings.warn(f"dim={self.dim} is not below C={C}; using dim={self.dim_}", RuntimeWarning, stacklevel=4)
        moments = self._acc.moments
        self.origin_ = -torch.linalg.pinv(self.weight_) @ self.bias_  # (C,)
        shift = moments.mean[0].cpu() - self.origin_  # (C,) m - u
        second = moments.scatter[0].cpu() / moments.n[0].cpu() + torch.outer(shift, shift)  # (C, C) E[(f-u)(f-u)^T]
        _, evecs = torch.linalg.eigh(second)  # ascending eigenvalues
        self.residual_basis_ = evecs[:, : C - self.dim_]  # (C, C - dim) the smallest eigenvalues
        self._fit_count = int(moments.n[0].item())
        self._acc = None

    def _fit_end(self) -> None:
        mean_norm = self._norm_sum / max(self._norm_count, 1)
        if not mean_norm > 0:
            raise ValueError(
                f"the fit features have no component outside the {self.dim_}-d principal subspace; use a smaller dim"
            )
        self.alpha_ = float(self._max_logit_sum / self._fit_count / mean_norm)

    def _state(self) -> dict[str, Tensor]:
        alpha = torch.tensor(self.alpha_, dtype=torch.float64)  # () from a Python float, exactly
        return {"weight": self.weight_, "bias": self.bias_, "origin": self.origin_, "residual_basis": self.residual_basis_, "alpha": alpha}

    def _install_state(self, tensors: dict[str, Tensor], dims: dict[str, int]) -> None:
        self.weight_, self.bias_, self.origin_ = tensors["weight"], tensors["bias"], tensors["origin"]
        self.residual_basis_, self.alpha_ = tensors["residual_basis"], float(tensors["alpha"])
        self.channels_, self.dim_ = dims["C"], dims["C"] - dims["R"]

    @classmethod
    def _check_state_values(cls, tensors: Mapping[str, Tensor], dims: dict[str, int]) -> None:
        if dims["R"] >= dims["C"]:
            raise ValueError(f"tensor 'residual_basis' must have fewer than C={dims['C']} columns; got {dims['R']}")

    def check_model(self, classes: int) -> None:
        """Refuse a model with another number of classes than the saved head."""
        if self.weight_.shape[0] != classes:
            raise ValueError(f"it has {classes} classes, the detector's saved head {self.weight_.shape[0]}")

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """``alpha ||(f - u) R|| - logsumexp(W f + b)`` (N,) from the features of ``feature_layer``."""
        check_is_fitted(self)
        f = penultimate_features(feats, self.feature_layer, self.channels_)  # (N, C)
        scores = (self.alpha_ * self._residual_norm(f) - self._logits(f).logsumexp(1)).to(f.dtype)
        return warn_nonfinite(scores, ~torch.isfinite(f).all(1))
