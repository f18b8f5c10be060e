"""The learned state of a patch detector: read-only views and installation.

What :mod:`covguard.persistence` saves and loads, through public methods only: per layer the
fitted :class:`~covguard.covariance.QuadraticForm` (``forms_``), ``C`` (``channels_``), and for
relative distances the shared background form (``background_forms_``); the fitted layer fusion
(``fusion_state()``). Mixed into :class:`~covguard.detectors.patch.PatchMahalanobis`, which owns
the per-layer ``gaussians`` and the ``layer_fusion`` these read.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from covguard.covariance import QuadraticForm
from covguard.detectors.base import check_is_fitted

__all__ = ["PatchState"]


class PatchState:
    """Learned state of :class:`~covguard.detectors.patch.PatchMahalanobis` (a mixin)."""

    @property
    def forms_(self) -> dict[str, QuadraticForm]:
        """The fitted form of each layer (CPU, float64)."""
        return {layer: g.form_ for layer, g in self.gaussians.items() if g.form_ is not None}

    @property
    def channels_(self) -> dict[str, int]:
        """Channels ``C`` of each fitted layer."""
        return {layer: g.channels_ for layer, g in self.gaussians.items() if g.channels_ is not None}

    @property
    def background_forms_(self) -> dict[str, QuadraticForm]:
        """The shared form (K = 1) whose distance relative distances subtract, per layer (CPU,
        float64); empty unless the detector scores relative distances."""
        return {layer: g.background_ for layer, g in self.gaussians.items() if g.background_ is not None}

    @property
    def score_mean_(self) -> Tensor | None:
        """Mean of each layer's score over held-out images, (L,) float64."""
        return self.layer_fusion.mean_

    @property
    def score_std_(self) -> Tensor | None:
        """Standard deviation of each layer's score over held-out images, (L,) float64."""
        return self.layer_fusion.std_

    def fusion_state(self) -> dict[str, Tensor]:
        """The fitted layer fusion: ``mean``, ``std`` (L,) float64 and, with ``fusion="gaussian"``,
        ``correlation`` (L, L) float64, the correlation matrix of the held-out layer scores."""
        check_is_fitted(self)
        return self.layer_fusion.state()

    @property
    def is_fitted(self) -> bool:
        return len(self.forms_) == len(self.layers) and self.layer_fusion.is_fitted

    def set_state(
        self,
        forms: Mapping[str, QuadraticForm],
        channels: Mapping[str, int],
        *,
        score_mean: Tensor,
        score_std: Tensor,
        input_shape: tuple[int, int, int],
        model_sha256: str | None,
        score_correlation: Tensor | None = None,
        background_forms: Mapping[str, QuadraticForm] | None = None,
    ) -> None:
        """Install a learned state (as :mod:`covguard.persistence` reads it from a file).

        Parameters
        ----------
        forms, channels
            Per layer: the fitted form and ``C``.
        score_mean, score_std : Tensor of shape (L,)
            The layer standardization (:meth:`fusion_state`).
        input_shape : tuple (C, H, W)
        model_sha256 : str or None
        score_correlation : Tensor of shape (L, L), optional
            Needed exactly when ``fusion="gaussian"``.
        background_forms : mapping of layer to QuadraticForm, optional
            Needed exactly for relative distances (:attr:`background_forms_`).
        """
        self.set_forms(
            forms, channels, background_forms=background_forms, input_shape=input_shape, model_sha256=model_sha256
        )
        self.layer_fusion.set(score_mean, score_std, score_correlation)

    def set_forms(
        self,
        forms: Mapping[str, QuadraticForm],
        channels: Mapping[str, int],
        *,
        background_forms: Mapping[str, QuadraticForm] | None,
        input_shape: tuple[int, int, int] | None,
        model_sha256: str | None,
    ) -> None:
        """Install fitted forms without the layer fusion (:meth:`set_standardization` fits it;
        parameters as :meth:`set_state`)."""
        relative = self.relative_distances
        if (background_forms is None) == relative:
            need = "needs" if relative else "takes no"
            raise ValueError(f"{type(self).__name__} with relative={relative} {need} background_forms")
        for layer, g in self.gaussians.items():
            g.set_form(forms[layer], int(channels[layer]), None if background_forms is None else background_forms[layer])
        self.input_shape_ = None if input_shape is None else tuple(input_shape)
        self.model_sha256_ = model_sha256
        self.fitted_ = True

    @property
    def relative_distances(self) -> bool:
        """Whether patch distances are relative to a shared background form (a Class option)."""
        return False
