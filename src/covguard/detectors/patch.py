"""Patch-Mahalanobis detectors (Simple and Class), assembled from three parts.

- per tapped layer a :class:`~covguard.detectors.patch_gaussian.PatchGaussian`: the moments of
  every ``k x k`` patch vector (``D = C k^2``) streamed into an accumulator, turned into a
  :class:`~covguard.covariance.QuadraticForm` per group, and squared distances of new patches
  computed as a convolution;
- a group-weighting policy (:mod:`covguard.detectors.class_weights`): which group statistics an
  image feeds at fit, which Gaussians its patches are measured against at score;
- a :class:`~covguard.detectors.layer_fusion.LayerFusion`: per-layer scores z-scored on held-out
  in-distribution data and summed (or their maximum, or a Gaussian of the layer-score vector).

The score path, features level then model level::

    distance_maps_features(logits, feats)  {layer: (N, H', W')} squared patch distances
    layer_scores_features(logits, feats)   (N, L) float64, each map aggregated (mean, max, top-q mean)
    score_features(logits, feats)          (N,) fused, in the model's dtype

    distance_maps(x), layer_scores(x), score(x)  the same from images

Scores saturate at the model dtype's largest finite value, so finite activations always give a
finite score; non-finite activations give +inf with a warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from covguard.covariance import CovarianceConfig, QuadraticForm
from covguard.detectors.aggregation import AGGREGATES, aggregate_layers, check_top_fraction
from covguard.detectors.base import Detector, check_is_fitted, warn_nonfinite
from covguard.detectors.distributed import sync_shards, use_distributed
from covguard.detectors.class_weights import ClassWeighting, SharedGroup
from covguard.detectors.layer_fusion import FUSIONS, LayerFusion, check_layer_scores
from covguard.detectors.accumulators import DiagonalAccumulator, ExactAccumulator, draw_positions
from covguard.detectors.patch_gaussian import NORMALIZATIONS, PatchGaussian, per_layer, saturate
from covguard.detectors.patch_state import PatchState
from covguard.features import model_device, model_dtype, parameter_sha256
from covguard.stats import Moments, all_reduce_moments, batch_moments, zero_moments

__all__ = ["AGGREGATES", "DEFAULT_FORM", "FUSIONS", "NORMALIZATIONS", "PatchMahalanobis"]

#: The default form and fit of both detectors, chosen by ``covguard bench frontier`` on validation
#: data and measured cost (results/frontier): low rank 32 (under 10 % overhead at batch 256 on
#: ResNet-18's four stages) from 5 % of each fit image's patch positions.
DEFAULT_FORM = {"covariance": "lowrank", "rank": 32, "fit_positions": 0.05}


class PatchMahalanobis(PatchState, Detector):
    """Base of :class:`SimpleMahalanobis` and :class:`ClassMahalanobis`.

    Parameters
    ----------
    model : nn.Module
        Classifier; images (N, C, H, W) -> logits (N, K).
    layers : sequence of str
        Module names to tap; each must output a map (N, C, H, W).
    covariance : {"full", "diag", "lowrank"}, default "lowrank"
        ``"full"`` with ``fit_positions=1.0`` gives exact statistics (:data:`DEFAULT_FORM`: the
        default trades about 1 AUROC point for a tenth of full covariance's cost).
    rank : int, default 32
        Eigenpairs kept by ``lowrank``.
    shrinkage : {"ridge", "oas"}
    eps : float
        Relative ridge ``eps * tr(S)/D * I`` (with ``shrinkage="ridge"``).
    kernel_size : int or mapping of layer -> int
        Patch side ``k``; 1 scores single positions (e.g. pooled penultimate features).
    padding : int or mapping of layer -> int
        Zero padding of each map before patch extraction.
    aggregate : {"mean", "max", "topq"}
        Per-patch map -> one score per image and layer: the mean, the maximum, or the mean of
        the ``max(1, round(top_fraction * L))`` largest (:mod:`~covguard.detectors.aggregation`).
    top_fraction : float, default 0.1
        Share of the patches averaged by ``"topq"``, in (0, 1]; unused otherwise.
    normalize : {"none", "position"}
        ``"position"`` (Mahalanobis++): each position's channel vector divided by its L2 norm
        plus ``1e-12`` before patches are formed, at fit and at score
        (:func:`~covguard.detectors.patch_gaussian.normalize_positions`). Needs its own fit.
    fusion : {"sum", "max", "gaussian"}
        Layer scores z-scored on held-out images -> one score: their sum, their maximum, or the
        squared Mahalanobis distance of the layer-score vector to a Gaussian of the held-out ones
        (two-sided; :mod:`~covguard.detectors.layer_fusion`). One layer: its raw score, but for
        ``"gaussian"`` (which then needs held-out images too).
    keep_moments : bool
        Keep the fitted moments (``moments_``, float64: ``K D^2`` numbers per layer) so that
        :meth:`refit` derives other covariance forms without another pass over the data.
    fit_positions : float, default 0.05
        Share of each fit image's patch positions accumulated, in (0, 1]: a seeded random
        ``max(1, round(fit_positions L))`` per image and layer (faster fits; scoring uses them all).
        The default suits tens of thousands of fit images; with a few hundred, pass 1.0.
    random_state : int
        Seed of those draws.

    Notes
    -----
    A group (the one group, or a class) whose fit patches have zero variance in every
    coordinate (constant features, one patch) has no Mahalanobis distance: it is an error for
    a single group; a class in that state uses the pooled covariance of all classes (warned).
    """

    supports_distributed: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Iterable[str],
        covariance: str = DEFAULT_FORM["covariance"],
        rank: int = DEFAULT_FORM["rank"],
        shrinkage: str = "ridge",
        eps: float = 0.01,
        kernel_size: int | Mapping[str, int] = 3,
        padding: int | Mapping[str, int] = 0,
        aggregate: str = "mean",
        top_fraction: float = 0.1,
        normalize: str = "none",
        fusion: str = "sum",
        keep_moments: bool = False,
        fit_positions: float = DEFAULT_FORM["fit_positions"],
        random_state: int = 0,
    ) -> None:
        super().__init__(model, layers=layers)
        if not self.layers:
            raise ValueError("layers must name at least one module")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}; got {aggregate!r}")
        check_top_fraction(top_fraction)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}; got {fusion!r}")
        self.covariance, self.rank, self.shrinkage, self.eps = covariance, rank, shrinkage, eps
        self.config = CovarianceConfig(form=covariance, shrinkage=shrinkage, eps=eps, rank=rank)
        self.kernel_size, self.padding = kernel_size, padding
        self.aggregate, self.top_fraction = aggregate, top_fraction
        self.normalize, self.fusion = normalize, fusion
        if isinstance(fit_positions, bool) or not isinstance(fit_positions, (int, float)) or not 0 < fit_positions <= 1:
            raise ValueError(f"fit_positions must be a number in (0, 1]; got {fit_positions!r}")
        self.keep_moments, self.fit_positions, self.random_state = keep_moments, fit_positions, random_state
        sizes = per_layer(kernel_size, self.layers, "kernel_size")
        pads = per_layer(padding, self.layers, "padding")
        self.gaussians = {
            layer: PatchGaussian(layer, kernel_size=sizes[layer], padding=pads[layer], normalize=normalize) for layer in self.layers
        }
        self.weighting: SharedGroup | ClassWeighting = SharedGroup()
        self.layer_fusion = LayerFusion(len(self.layers), fusion)
        self.moments_: dict[str, Moments] = {}
        self.model_sha256_: str | None = None
        self._accumulators: dict = {}

    # ---- fitting ------------------------------------------------------------------------------

    def fit(
        self, loader: Iterable, *, holdout: Iterable | None = None, progress: bool = True, distributed: bool | None = None
    ) -> PatchMahalanobis:
        """Fit the per-layer statistics, then standardize the layer scores.

        Parameters
        ----------
        loader : iterable of Tensor (N, C, H, W) or of tuples (x, y)
            In-distribution training images.
        holdout : iterable, optional
            Held-out in-distribution images that fit the layer fusion (each layer's mean and
            std, and the Gaussian of ``fusion="gaussian"``). With several layers (or a Gaussian)
            and no ``holdout``, ``loader`` is scored a second time for this (distances of
            training images are slightly optimistic).
        progress : bool
            Show progress bars.
        distributed : bool, optional
            Each process passes its own shard of ``loader`` (and ``holdout``); the moments and
            the layer standardization are all-reduced, so every rank ends with the detector of
            all the data. Default: when ``torch.distributed`` is initialized. See
            :meth:`Detector.fit`.

        Returns
        -------
        PatchMahalanobis
            ``self``.
        """
        super().fit(loader, progress=progress, distributed=distributed)
        if self.needs_holdout:
            source = holdout if holdout is not None else loader
            self.standardize(source, progress=progress, distributed=use_distributed(distributed))
        return self

    @property
    def needs_holdout(self) -> bool:
        """Whether fitting the layer fusion needs held-out layer scores (several layers, or
        ``fusion="gaussian"``); otherwise the fusion is the identity of the one layer score."""
        return self.layer_fusion.needs_holdout

    def set_standardization(self, layer_scores: Tensor) -> None:
        """Fit the layer fusion on held-out in-distribution images: each layer's mean and std
        (and the Gaussian of ``fusion="gaussian"``).

        Parameters
        ----------
        layer_scores : Tensor of shape (N, L)
            Layer scores (as :meth:`layer_scores_features` returns them) of N >= 2 held-out
            in-distribution images.
        """
        self.layer_fusion.fit(layer_scores)

    def standardize(self, holdout: Iterable, *, progress: bool = False, distributed: bool = False) -> None:
        """Fit the layer fusion on held-out in-distribution images (one scoring pass); with
        ``distributed``, on the union of every rank's ``holdout`` (all-reduced moments)."""
        per_layer, error = torch.zeros(0, len(self.layers), dtype=torch.float64), None
        try:
            batches = self._forward_loader(holdout, progress, "standardize")
            rows = [self.layer_scores_features(logits, feats).cpu() for _, logits, feats, _ in batches]
            if rows:
                per_layer = torch.cat(rows)  # (N, L)
            check_layer_scores(per_layer)
        except Exception as err:
            if not distributed:
                raise
            error = err
        if not distributed:
            self.set_standardization(per_layer)
            return
        device = model_device(self.model)
        sync_shards(error, None, device)
        local = batch_moments(per_layer.to(device)) if len(per_layer) else zero_moments(len(self.layers), device=device)
        self.layer_fusion.fit_moments(all_reduce_moments(local))

    @property
    def exact_moments(self) -> bool:
        """Whether a fit accumulates the exact moments of every group (:meth:`accumulated_moments`);
        a diagonal form with ridge shrinkage keeps per-coordinate statistics only (D, not D^2, per patch)."""
        return self.covariance != "diag" or self.shrinkage != "ridge" or self.keep_moments

    def _new_accumulator(self, dim: int, n_groups: int) -> ExactAccumulator | DiagonalAccumulator:
        return ExactAccumulator(dim, n_groups) if self.exact_moments else DiagonalAccumulator(dim, n_groups)

    def _fit_begin(self) -> None:
        self._accumulators, self.moments_ = {}, {}
        self._draws = torch.Generator().manual_seed(self.random_state)  # fit_positions
        self.layer_fusion = LayerFusion(len(self.layers), self.fusion)
        self.model_sha256_ = None
        for g in self.gaussians.values():
            g.form_, g.background_, g.channels_ = None, None, None

    def _fit_prepare(self, logits: Tensor, feats: dict[str, Tensor]) -> None:
        for layer, f in feats.items():
            g = self.gaussians[layer]
            g.check_map(f)
            if layer not in self._accumulators:
                g.channels_ = f.shape[1]
                dim = f.shape[1] * g.kernel_size**2
                self._accumulators[layer] = self._new_accumulator(dim, self.weighting.n_groups(logits))

    def _fit_batch(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> None:
        self._fit_prepare(logits, feats)
        weights = self.weighting.at_fit(logits, y)  # (N, K) or None
        for layer, f in feats.items():
            g = self.gaussians[layer]
            rows = draw_positions(f.shape[0], g.n_positions(f), self.fit_positions, self._draws)  # (N m,) or None: all
            self._accumulators[layer].update(self.current_pass, *g.patches(f, weights, rows))  # (M, D), (M, K) or None

    def _fit_end_pass(self, index: int) -> None:
        for acc in self._accumulators.values():
            acc.end_pass(index)
        self._draws.manual_seed(self.random_state)  # a next pass (basis_rank) draws the same positions

    def _fit_reduce(self) -> None:
        device = model_device(self.model)
        for acc in self._accumulators.values():
            acc.all_reduce(device)

    def _empty_groups(self, layer: str, counts: Tensor) -> list[int]:
        """Groups of total weight 0 that take the pooled statistics (none for a shared group)."""
        return []

    def _background_form(self, layer: str, acc: ExactAccumulator) -> QuadraticForm | None:
        """The shared form relative distances subtract (None: absolute distances)."""
        return None

    def _fit_end(self) -> None:
        for layer, acc in self._accumulators.items():
            g = self.gaussians[layer]
            form = acc.form(layer, self.config, self._empty_groups(layer, acc.counts()))
            g.set_form(form, g.channels_, self._background_form(layer, acc))
        if self.keep_moments:
            self.moments_ = {
                layer: Moments(acc.moments.n.cpu(), acc.moments.mean.cpu(), acc.moments.scatter.cpu())
                for layer, acc in self._accumulators.items()
            }
        self._accumulators = {}
        self.model_sha256_ = parameter_sha256(self.model)

    def accumulated_moments(self) -> dict[str, Moments]:
        """The moments accumulated so far in a one-pass exact fit, {layer: Moments} (before
        :meth:`finish_fit`, which discards them unless ``keep_moments``)."""
        if self.current_pass is None or self.fit_passes != 1:
            raise ValueError("accumulated_moments is read during a one-pass fit, between partial_fit and finish_fit")
        return {layer: acc.moments for layer, acc in self._accumulators.items()}

    def fit_moments(self, moments: Mapping[str, Moments], *, input_shape: tuple[int, int, int] | None = None) -> PatchMahalanobis:
        """Fit the layer forms from given patch moments (exact, per group) instead of data.

        Parameters
        ----------
        moments : mapping of layer to Moments
            Moments of each layer's patch vectors, with this detector's number of groups and
            ``D = C k^2``.
        input_shape : tuple (C, H, W), optional

        Returns
        -------
        PatchMahalanobis
            ``self``, fitted but for the layer standardization of several layers
            (:meth:`set_standardization`).
        """
        self._start_fit()
        for layer in self.layers:
            m, g = moments[layer], self.gaussians[layer]
            channels, rem = divmod(m.dim, g.kernel_size**2)
            if rem:
                raise ValueError(f"moments of layer {layer!r} have D={m.dim}, not a multiple of kernel_size^2={g.kernel_size**2}")
            g.channels_ = channels
            self._accumulators[layer] = ExactAccumulator.from_moments(m)
        self._pass = None
        self._fit_end()
        self.input_shape_ = input_shape
        self.fitted_ = True
        return self

    def refit(self, *, holdout: Iterable | None, progress: bool = False, **changes: Any) -> PatchMahalanobis:
        """A fitted copy with other hyperparameters, derived from the fitted state (no pass over the fit data).

        Scoring changes (``aggregate``, ``top_fraction``, ``fusion``; Class: ``scoring``,
        ``top_m``, ``relative=False``) reuse the fitted forms; estimation changes (``covariance``,
        ``rank``, ``shrinkage``, ``eps``; Class: ``relative=True``) re-estimate them from the kept
        moments (``keep_moments=True``); the layers, the patch geometry, ``normalize`` and what
        the statistics were accumulated with need a new fit (:mod:`~covguard.detectors.refit`).
        The copy's layer fusion is fitted anew on ``holdout``.

        Parameters
        ----------
        holdout : iterable or None
            Held-out in-distribution images for the copy's layer fusion (as in :meth:`fit`);
            may be None where it needs none (one layer, not ``fusion="gaussian"``).
        progress : bool
            Progress bar of the standardization pass.
        **changes
            Constructor parameters to change.

        Returns
        -------
        PatchMahalanobis
            A fitted detector of the same class, sharing the model, the forms or the moments.
        """
        from covguard.detectors.refit import refit_patch_detector

        return refit_patch_detector(self, holdout=holdout, progress=progress, changes=changes)

    # ---- scoring ------------------------------------------------------------------------------

    def distance_maps_features(self, logits: Tensor, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Squared distance of every patch, {layer: (N, H', W')} in the features' dtype (saturated)."""
        check_is_fitted(self)
        groups = self.weighting.score_groups(logits)
        return {layer: saturate(*g.distance_map(feats[layer], groups), feats[layer].dtype) for layer, g in self.gaussians.items()}

    def _layer_scores(self, logits: Tensor, feats: dict[str, Tensor]) -> tuple[Tensor, bool]:
        """:meth:`layer_scores_features` and whether every score is finite (one host sync)."""
        if len(self.forms_) != len(self.layers):
            check_is_fitted(self)
        return aggregate_layers(self.gaussians, feats, self.weighting.score_groups(logits), self.aggregate, self.top_fraction)

    def layer_scores_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Aggregated score of each layer, (N, L) float64; +inf where activations are not finite.

        Needs the fitted forms only (not the layer standardization), so it serves to standardize.
        """
        return self._layer_scores(logits, feats)[0]

    def combine(self, layer_scores: Tensor) -> Tensor:
        """The fused score (N,) in the model's dtype from layer scores (N, L): the sum (maximum,
        Gaussian distance: ``fusion``) of z-scored layer scores (the raw score for one layer),
        computed in float64 and saturating at the dtype's largest finite value; +inf (warned)
        where a layer score is not finite (non-finite activations)."""
        check_is_fitted(self)
        bad = ~torch.isfinite(layer_scores).all(1)  # (N,)
        fused = self.layer_fusion.combine(layer_scores)  # (N,) float64
        return warn_nonfinite(saturate(fused, ~bad, model_dtype(self.model)), bad)

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Fused score (N,) in the model's dtype (:meth:`combine` of the layer scores)."""
        scores, finite = self._layer_scores(logits, feats)
        if not finite:
            return self.combine(scores)
        check_is_fitted(self)  # every score finite: combine without looking for non-finite ones
        return saturate(self.layer_fusion.combine(scores), None, model_dtype(self.model))

    @torch.no_grad()
    def distance_maps(self, x: Tensor) -> dict[str, Tensor]:
        """Squared distance of every patch of images (N, C, H, W): {layer: (N, H', W')}."""
        return self.distance_maps_features(*self.forward(x))

    @torch.no_grad()
    def layer_scores(self, x: Tensor) -> Tensor:
        """Unstandardized score of each layer of images (N, C, H, W): (N, L) float64."""
        return self.layer_scores_features(*self.forward(x))
