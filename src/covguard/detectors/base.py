"""The detector contract: ``fit(loader)`` then ``score(x)``; larger score = more anomalous.

Two levels, as in pytorch-ood: the model level (``fit(loader)``, ``score(x)``) runs the network
and calls the features level (``partial_fit(logits, feats, y)`` per batch, ``finish_fit()`` per
pass over the data, ``score_features(logits, feats)``), which anyone holding the captured
features can call directly (:func:`~covguard.detectors.multi.fit_detectors` does). A detector
whose fit reads the data more than once declares it in :attr:`Detector.fit_passes`.

The base class owns the plumbing every detector shares and nothing else: input validation,
eval mode (restored afterwards), ``no_grad``, one forward pass capturing the layers a detector
needs, progress bars over loaders. Subclasses implement the hooks ``_fit_begin`` /
``_fit_batch`` / ``_fit_end_pass`` / ``_fit_end`` behind the public features-level methods.
"""

from __future__ import annotations

import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.detectors.distributed import sync_shards, use_distributed
from covguard.features import FeatureTap, check_layers, eval_mode, model_device, model_dtype

__all__ = [
    "Detector",
    "NotFittedError",
    "check_finite_features",
    "check_is_fitted",
    "eval_mode",
    "unpack_batch",
    "warn_nonfinite",
]


class NotFittedError(ValueError, AttributeError):
    """Raised when a detector is used before ``fit``."""


def check_is_fitted(detector: Detector) -> None:
    """Raise :class:`NotFittedError` unless ``detector`` has been fitted."""
    if not detector.is_fitted:
        raise NotFittedError(f"{type(detector).__name__} is not fitted yet; call fit(loader) first")


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Split a loader batch into images and optional labels.

    Accepts a tensor ``x`` or a tuple/list ``(x, y, ...)``.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise TypeError(f"loader batches must be a Tensor x or a tuple (x, y); got {type(batch).__name__}")


class Detector(ABC):
    """Base class of all detectors.

    Parameters
    ----------
    model : nn.Module
        Classifier mapping images (N, C, H, W) to logits (N, K). Its device is used for all
        computation; inputs are moved there.
    layers : sequence of str
        Names of the modules (``model.named_modules()``) whose outputs the detector reads;
        empty for detectors that need only the logits.
    """

    #: Whether ``score`` needs a prior ``fit``.
    requires_fit: ClassVar[bool] = True
    #: Whether ``fit`` can all-reduce its statistics across processes (``_fit_prepare`` and
    #: ``_fit_reduce`` implemented).
    supports_distributed: ClassVar[bool] = False

    #: Passes over the fit data (ViM, e.g., reads it twice); see :meth:`finish_fit`.
    fit_passes: int = 1

    def __init__(self, model: nn.Module, *, layers: Iterable[str] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.model = model
        self.layers = check_layers(model, layers)
        self.input_shape_: tuple[int, int, int] | None = None
        self.fitted_ = False
        self._pass: int | None = None  # the pass partial_fit accumulates into; None between fits

    @property
    def is_fitted(self) -> bool:
        return not self.requires_fit or self.fitted_

    def get_params(self) -> dict[str, Any]:
        """The constructor's keyword arguments as given (scikit-learn's convention), ``model`` aside."""
        signature = inspect.signature(type(self).__init__)
        names = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
        return {name: getattr(self, name) for name in names}

    def clone(self, **changes: Any) -> Detector:
        """A new, unfitted detector of the same class and model with ``changes`` to its parameters.

        Raises
        ------
        ValueError
            If ``changes`` names a parameter the detector does not take.
        """
        params = self.get_params()
        unknown = sorted(set(changes) - set(params))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameters {unknown}; it takes {sorted(params)}")
        return type(self)(self.model, **{**params, **changes})

    # ---- features-level fitting ----------------------------------------------------------------

    @property
    def current_pass(self) -> int | None:
        """Index of the fit pass being accumulated (0 .. ``fit_passes - 1``); None between fits."""
        return self._pass

    def partial_fit(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None = None) -> Detector:
        """Accumulate one batch of captured features into the current fit pass.

        The first call after a finished (or no) fit starts a new fit and forgets the learned
        state. Feature maps must be finite (:func:`check_finite_features`).

        Parameters
        ----------
        logits : Tensor of shape (N, K)
        feats : dict of str to Tensor
            The output of every layer in ``layers``, e.g. {layer: (N, C, H, W)}.
        y : Tensor of shape (N,), optional
            Integer labels, for detectors that need them.

        Returns
        -------
        Detector
            ``self``.
        """
        if self._pass is None:
            self._start_fit()
        self._fit_batch(logits, feats, y)
        return self

    def finish_fit(self, *, input_shape: tuple[int, int, int] | None = None) -> Detector:
        """End the current pass over the fit data; after the last one, set the learned state.

        A detector with ``fit_passes > 1`` needs the same data fed again through
        :meth:`partial_fit` after each earlier pass.

        Parameters
        ----------
        input_shape : tuple (C, H, W), optional
            The images' shape, recorded for persistence and checks at load time.

        Returns
        -------
        Detector
            ``self``.
        """
        if self._pass is None:
            raise ValueError("finish_fit needs partial_fit calls first: nothing is being fitted")
        self._fit_end_pass(self._pass)
        if self._pass + 1 < self.fit_passes:
            self._pass += 1
            return self
        self._pass = None
        self._fit_end()
        self.input_shape_ = None if input_shape is None else tuple(int(v) for v in input_shape)
        self.fitted_ = True
        return self

    def _start_fit(self) -> None:
        self._pass, self.fitted_, self.input_shape_ = 0, False, None
        self._fit_begin()

    # ---- model-level API -------------------------------------------------------------------

    def fit(self, loader: Iterable, *, progress: bool = True, distributed: bool | None = None) -> Detector:
        """Fit on in-distribution data in ``fit_passes`` streaming passes over ``loader``.

        Parameters
        ----------
        loader : iterable of Tensor (N, C, H, W) or of tuples (x, y)
            In-distribution images in the model's input range; labels (N,) where the detector
            needs them. Re-iterable (a list, a DataLoader) when ``fit_passes > 1``. With
            ``distributed``, this process's shard of the data.
        progress : bool
            Show a progress bar.
        distributed : bool, optional
            All-reduce the statistics of every process's shard (``torch.distributed``), so that
            every rank ends with the detector of the union of the shards. Default: when a
            process group is initialized and the detector supports it; then every rank of the
            group must call ``fit`` (pass ``False`` to fit on this process's data alone).

        Returns
        -------
        Detector
            ``self``.

        Raises
        ------
        ValueError
            Empty loader (on every rank); activations that are not finite (naming the layer and
            the batch); ``distributed=True`` without a process group or for a detector that
            cannot merge its statistics; ranks that fed different input shapes.
        TypeError
            A one-shot iterator as ``loader`` of a multi-pass fit.
        """
        if distributed and not self.supports_distributed:
            raise ValueError(f"{type(self).__name__} cannot fit distributed; fit it on one process (distributed=False)")
        distributed = self.supports_distributed and use_distributed(distributed)
        if self.fit_passes > 1 and iter(loader) is loader:
            raise TypeError(
                f"loader must be re-iterable (a list or a DataLoader, not a one-shot iterator): {type(self).__name__} "
                f"reads the loader {self.fit_passes} times"
            )
        self._start_fit()
        rank = ""
        if distributed:
            import torch.distributed as dist

            rank = f" on rank {dist.get_rank()}"
        for index in range(self.fit_passes):
            desc = f"fit {type(self).__name__}" + (f" (pass {index + 1})" if self.fit_passes > 1 else "")
            shape, error = None, None
            try:
                for b, (x, logits, feats, y) in enumerate(self._forward_loader(loader, progress, desc)):
                    shape = shape or tuple(x.shape[1:])
                    check_finite_features(feats, f"batch {b}{rank}")
                    self.partial_fit(logits, feats, y)
            except Exception as err:
                if not distributed:
                    raise
                error = err
            if distributed:
                shape = self._reduce_shards(error, shape)
            if shape is None:
                raise ValueError("loader is empty: fit needs at least one batch of in-distribution images")
            self.finish_fit(input_shape=shape)
        return self

    def _reduce_shards(self, error: BaseException | None, shape: tuple | None) -> tuple:
        """All-reduce the statistics of every rank's shard; returns the common input shape."""
        shapes = sync_shards(error, shape, model_device(self.model))
        seen = sorted({s for s in shapes if s is not None})
        if not seen:
            raise ValueError("loader is empty on every rank: fit needs at least one batch of in-distribution images")
        if len(seen) > 1:
            raise ValueError(f"every rank must feed images of one shape (C, H, W); ranks saw {shapes}")
        if shape is None:  # empty shard: set up zero statistics of the right sizes
            with eval_mode(self.model), torch.no_grad(), FeatureTap(self.model, self.layers) as tap:
                x = torch.zeros(1, *seen[0], dtype=model_dtype(self.model), device=model_device(self.model))
                self._fit_prepare(*tap(x))
        self._fit_reduce()
        return seen[0]

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """Anomaly score of each image; larger = more anomalous.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)

        Returns
        -------
        Tensor of shape (N,)
        """
        logits, feats = self.forward(x)
        return self.score_features(logits, feats)

    def score_loader(self, loader: Iterable, *, progress: bool = True) -> Tensor:
        """Scores of every image of a loader (through :meth:`score`), on the CPU; shape (total,)."""
        check_is_fitted(self)
        total = len(loader) if hasattr(loader, "__len__") else None
        batches = (unpack_batch(b)[0] for b in tqdm(loader, desc=f"score {type(self).__name__}", total=total, disable=not progress, leave=False))
        out = [self.score(x).cpu() for x in batches if x.shape[0] > 0]
        if not out:
            raise ValueError("loader is empty: nothing to score")
        return torch.cat(out)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Validate ``x`` and run the model once: logits (N, K) and the detector's feature maps."""
        check_is_fitted(self)
        with eval_mode(self.model), FeatureTap(self.model, self.layers) as tap:
            return tap(self.check_input(x))

    @torch.no_grad()
    def logits_and_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The model's logits and the detector's scores, from one forward pass where possible.

        Detectors that override :meth:`score` (ODIN perturbs its input first) are scored by
        their own ``score(x)`` after a plain forward for the logits.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)

        Returns
        -------
        logits : Tensor of shape (N, K)
        scores : Tensor of shape (N,)
            Larger = more anomalous.
        """
        if type(self).score is not Detector.score:
            logits, _ = self.forward(x)
            return logits, self.score(x)
        logits, feats = self.forward(x)
        return logits, self.score_features(logits, feats)

    # ---- features-level API (implemented by subclasses) ----------------------------------

    @abstractmethod
    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Scores (N,) from logits (N, K) and captured feature maps {layer: (N, C, H, W)}."""

    def _fit_begin(self) -> None:
        """Reset the accumulated statistics."""

    def _fit_batch(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None) -> None:
        """Accumulate one batch into pass :attr:`current_pass`."""

    def _fit_end_pass(self, index: int) -> None:
        """Between passes of a multi-pass fit: derive what the next pass needs."""

    def _fit_end(self) -> None:
        """Turn the statistics into the learned state."""

    def _fit_prepare(self, logits: Tensor, feats: dict[str, Tensor]) -> None:
        """Set up empty statistics sized for these outputs (a rank with an empty shard)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fit distributed")

    def _fit_reduce(self) -> None:
        """All-reduce the accumulated statistics across the process group."""
        raise NotImplementedError(f"{type(self).__name__} cannot fit distributed")

    # ---- plumbing ----------------------------------------------------------------------------

    def check_input(self, x: Tensor) -> Tensor:
        """Validate a batch of images (N, C, H, W) for the model and move it to the model's device.

        Raises
        ------
        TypeError, ValueError
            Not a tensor; not 4-D; not the model's dtype; other channels than at fit time.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (N, C, H, W); got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must be a 4-D tensor (N, C, H, W); got shape {tuple(x.shape)}")
        dtype = model_dtype(self.model)
        if x.dtype != dtype:
            raise ValueError(f"x must have the model's dtype {dtype}; got {x.dtype}")
        if self.input_shape_ is not None and x.shape[1] != self.input_shape_[0]:
            raise ValueError(
                f"x must have C={self.input_shape_[0]} channels (as at fit time); got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        if self.input_shape_ is not None and tuple(x.shape[2:]) != tuple(self.input_shape_[1:]):
            warnings.warn(
                f"x is {x.shape[2]}x{x.shape[3]} but the detector was fitted on {self.input_shape_[1]}x"
                f"{self.input_shape_[2]} images: its scores (and a guard's threshold) are not calibrated for this "
                "size; resize the images to the fitted size",
                UserWarning,
                stacklevel=4,
            )
        return x.to(model_device(self.model))

    def _forward_loader(
        self, loader: Iterable, progress: bool, desc: str
    ) -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor], Tensor | None]]:
        """Yield ``(x, logits, feats, y)`` for every non-empty batch of ``loader``."""
        device = model_device(self.model)
        total = len(loader) if hasattr(loader, "__len__") else None
        with eval_mode(self.model), torch.no_grad(), FeatureTap(self.model, self.layers) as tap:
            for batch in tqdm(loader, desc=desc, total=total, disable=not progress, leave=False):
                x, y = unpack_batch(batch)
                if x.shape[0] == 0:
                    continue
                x = self.check_input(x)
                logits, feats = tap(x)
                yield x, logits, feats, None if y is None else y.to(device)


def check_finite_features(feats: dict[str, Tensor], where: str) -> None:
    """Raise ValueError naming the first layer of ``feats`` whose activations hold NaN or inf.

    Parameters
    ----------
    feats : dict of str to Tensor
    where : str
        Which batch, for the message (``"batch 3"``).
    """
    for name, f in feats.items():
        if not torch.isfinite(f).all():
            raise ValueError(f"activations of layer {name!r} in {where} contain NaN or inf")


def warn_nonfinite(scores: Tensor, bad: Tensor) -> Tensor:
    """Set the scores of images whose activations are not finite to +inf, with a warning.

    Parameters
    ----------
    scores : Tensor of shape (N,)
    bad : BoolTensor of shape (N,)
    """
    if bad.any():
        warnings.warn(
            f"{int(bad.sum())} of {bad.numel()} inputs have non-finite activations; their score is +inf",
            RuntimeWarning,
            stacklevel=3,
        )
        scores = scores.masked_fill(bad, float("inf"))
    return scores
