"""Class patch Mahalanobis: class-conditional patch Gaussians, weighted by the model's own beliefs."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from covguard.covariance import QuadraticForm, quadratic_form
from covguard.detectors.class_weights import CLASS_WEIGHTS, SCORINGS, ClassWeighting
from covguard.detectors.patch import DEFAULT_FORM, PatchMahalanobis
from covguard.detectors.accumulators import DiagonalAccumulator, ExactAccumulator, SharedBasisAccumulator, repair_degenerate

__all__ = ["CLASS_WEIGHTS", "SCORINGS", "ClassMahalanobis"]


class ClassMahalanobis(PatchMahalanobis):
    """Class-conditional patch Mahalanobis distances.

    Fit: the patch moments of each class ``k`` weight each image by ``w_k``: its one-hot label
    (``"label"``), the model's predicted probabilities (``"probs"``), or its one-hot label only
    when the model classifies it correctly (``"correct"``, as the original authors did).
    A class left with no weight falls back to the pooled statistics of all classes, with a warning.

    Score: per patch, ``top1`` takes the distance to the predicted class; ``mixture`` takes
    ``sum_k pi_k d2_k`` over the ``top_m`` most probable classes (probabilities renormalized
    over them). Then the map is aggregated as in :class:`SimpleMahalanobis`.

    Relative distances (``relative=True``, RMDS's idea per patch): each patch's class distance
    minus its distance to the shared Gaussian of the layer, ``d2_class(p) - d2_shared(p)``
    (``sum_k pi_k d2_k - d2_shared`` for ``mixture``: the weights sum to 1). The shared Gaussian
    is the pool of the class moments: the moments of every fit patch with ``class_weights``
    ``"label"`` or ``"probs"``, of the correctly classified images' patches with ``"correct"``;
    it takes the same covariance form. What the class Gaussian explains no better than the
    shared one (directions of generic image statistics) cancels. The map can be negative (a
    patch closer to its class than to the pool); mean, max and top-q aggregation and the layer
    fusion work as they do for absolute distances.

    Parameters
    ----------
    class_weights : {"label", "probs", "correct"}
    scoring : {"top1", "mixture"}
    top_m : int
        Classes mixed by ``"mixture"``.
    basis_rank : int, optional
        Accumulate the class statistics in a reduced form (:mod:`covguard.class_stats`): a
        shared basis of this rank from the pooled within-class covariance, then each class's
        covariance inside it, in two passes over ``loader`` (which must be re-iterable).
        Memory ``D^2 + K (D + r^2)`` numbers instead of ``K D^2``: 100 classes at ``D = 4608``
        need 0.2 GB instead of 17 GB. Needs ``covariance="lowrank"`` (rank <= basis_rank) with
        ``shrinkage="ridge"``; not distributed. With ``relative``, the shared Gaussian is exact:
        the pooled within-class scatter of the first pass plus the scatter of the class means.
    relative : bool, default False
        Score ``d2_class - d2_shared`` per patch (above). Adds one shared form per layer (one
        more convolution at score); :attr:`background_forms_` holds them.
    model, layers, covariance, rank, shrinkage, eps, kernel_size, padding, aggregate, top_fraction, normalize, fusion,
    keep_moments, fit_positions, random_state
        As :class:`~covguard.detectors.patch.PatchMahalanobis`.
    """

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
        class_weights: str = "label",
        scoring: str = "top1",
        top_m: int = 3,
        basis_rank: int | None = None,
        relative: bool = False,
    ) -> None:
        super().__init__(
            model, layers=layers, covariance=covariance, rank=rank, shrinkage=shrinkage, eps=eps,
            kernel_size=kernel_size, padding=padding, aggregate=aggregate, top_fraction=top_fraction,
            normalize=normalize, fusion=fusion, keep_moments=keep_moments, fit_positions=fit_positions,
            random_state=random_state,
        )
        if basis_rank is not None:
            if isinstance(basis_rank, bool) or not isinstance(basis_rank, int) or basis_rank < 1:
                raise ValueError(f"basis_rank must be a positive integer or None; got {basis_rank!r}")
            if covariance != "lowrank" or shrinkage != "ridge" or rank > basis_rank:
                raise ValueError(
                    f"basis_rank needs covariance='lowrank' with rank <= basis_rank and shrinkage='ridge'; got "
                    f"covariance={covariance!r}, rank={rank}, shrinkage={shrinkage!r}"
                )
            if keep_moments:
                raise ValueError("keep_moments=True needs exact class moments; it cannot be combined with basis_rank")
        if class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}; got {class_weights!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}; got {scoring!r}")
        if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1:
            raise ValueError(f"top_m must be an integer >= 1; got {top_m!r}")
        if not isinstance(relative, bool):
            raise ValueError(f"relative must be True or False; got {relative!r}")
        self.class_weights, self.scoring, self.top_m, self.basis_rank = class_weights, scoring, top_m, basis_rank
        self.relative = relative
        self.weighting = ClassWeighting(class_weights, scoring, top_m)
        self.empty_classes_: dict[str, list[int]] = {}

    @property
    def supports_distributed(self) -> bool:  # reduced statistics do not all-reduce
        return self.basis_rank is None

    @property
    def relative_distances(self) -> bool:
        return self.relative

    @property
    def fit_passes(self) -> int:
        return 1 if self.basis_rank is None else 2  # reduced statistics: basis, then classes inside it

    @property
    def exact_moments(self) -> bool:
        # relative distances need the pooled moments of the classes, in any covariance form
        return self.basis_rank is None and (super().exact_moments or self.relative)

    def _new_accumulator(self, dim: int, n_groups: int) -> ExactAccumulator | DiagonalAccumulator | SharedBasisAccumulator:
        if self.basis_rank is None:
            return super()._new_accumulator(dim, n_groups)
        return SharedBasisAccumulator(dim, n_groups, self.basis_rank)

    def _background_form(self, layer: str, acc: ExactAccumulator | SharedBasisAccumulator) -> QuadraticForm | None:
        """With ``relative``: the form of the pooled class moments (K = 1), in this covariance form."""
        if not self.relative:
            return None
        return quadratic_form(repair_degenerate(layer, acc.pooled_moments()), self.config)

    def _fit_begin(self) -> None:
        super()._fit_begin()
        self.empty_classes_ = {}

    def _empty_groups(self, layer: str, counts: Tensor) -> list[int]:
        """Classes of total weight 0 (recorded and warned: they take pooled statistics); raises if all are."""
        empty = (counts <= 0).nonzero().flatten().tolist()
        if len(empty) == len(counts):
            raise ValueError(
                f"no class received any weight at layer {layer!r} (class_weights={self.class_weights!r}); "
                "with 'correct', the model classified no fit image correctly"
            )
        if empty:
            self.empty_classes_[layer] = empty
            warnings.warn(
                f"classes {empty} have no fit samples at layer {layer!r}; they use the pooled statistics of all classes",
                RuntimeWarning,
                stacklevel=6,
            )
        return empty
