"""The detector contract: ``fit(loader)`` then ``score(x)``; larger score = more anomalous.

The base class owns the plumbing every detector shares and nothing else: input validation,
eval mode (restored afterwards), ``no_grad``, one forward pass capturing the layers a detector
needs, progress bars over loaders. Subclasses implement the features-level hooks
``_fit_begin`` / ``_fit_batch`` / ``_fit_end`` and ``score_features``.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.features import FeatureTap, check_layers, model_device

__all__ = [
    "Detector",
    "NotFittedError",
    "check_is_fitted",
    "eval_mode",
    "parameter_sha256",
    "sync_shards",
    "unpack_batch",
    "use_distributed",
    "warn_nonfinite",
]


class NotFittedError(ValueError, AttributeError):
    """Raised when a detector is used before ``fit``."""


def check_is_fitted(detector: Detector) -> None:
    """Raise :class:`NotFittedError` unless ``detector`` has been fitted."""
    if not detector.is_fitted:
        raise NotFittedError(f"{type(detector).__name__} is not fitted yet; call fit(loader) first")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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


def parameter_sha256(model: nn.Module) -> str:
    """SHA-256 (hex) of the model's state dict: every tensor's key, dtype, shape and bytes, in key order.

    Identifies the exact weights a detector was fitted on (parameters and persistent buffers
    such as BatchNorm running statistics); any fine-tuning step changes it.
    """
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
        digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def use_distributed(distributed: bool | None) -> bool:
    """Resolve a ``distributed=`` argument: None means "when torch.distributed is initialized".

    Raises
    ------
    ValueError
        If ``distributed=True`` and no process group is initialized.
    """
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return initialized
    if distributed and not initialized:
        raise ValueError(
            "distributed=True needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group first (torchrun sets the environment it reads)"
        )
    return bool(distributed)


def sync_shards(
    error: BaseException | None, shape: tuple[int, ...] | None, device: torch.device
) -> list[tuple[int, ...] | None]:
    """Exchange, across the process group, whether each rank's local pass failed and what it saw.

    Every rank calls this after a local pass, error or not, so that no rank is left waiting in
    a later collective. If any rank failed, every rank raises: the failed ranks their own error,
    the others a RuntimeError naming the failed ranks.

    Parameters
    ----------
    error : BaseException or None
        What this rank's local pass raised.
    shape : tuple of int or None
        The input shape (C, H, W) this rank saw; None for an empty shard.
    device : torch.device
        Where the exchanged tensor lives (the model's device: CUDA for ``nccl``).

    Returns
    -------
    list of (tuple of int or None)
        The shape each rank saw, indexed by rank.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    table = torch.zeros(world, 5, dtype=torch.int64, device=device)  # (ranks, [failed, seen, C, H, W])
    table[rank, 0] = int(error is not None)
    if shape is not None:
        table[rank, 1] = 1
        table[rank, 2:] = torch.tensor(shape, dtype=torch.int64)
    dist.all_reduce(table)
    table = table.cpu()
    failed = table[:, 0].nonzero().flatten().tolist()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"fit failed on rank(s) {failed} of {world}; see the error raised there")
    return [tuple(row[2:].tolist()) if row[1] else None for row in table]


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

    @property
    def single_pass(self) -> bool:
        """Whether :meth:`fit` is one streaming pass of ``_fit_batch`` calls, which
        :func:`~covguard.detectors.multi.fit_detectors` can share with other detectors."""
        return True

    def __init__(self, model: nn.Module, *, layers: Iterable[str] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.model = model
        self.layers = check_layers(model, tuple(layers))
        self.input_shape_: tuple[int, int, int] | None = None

    @property
    def is_fitted(self) -> bool:
        return not self.requires_fit or self.input_shape_ is not None

    # ---- model-level API -------------------------------------------------------------------

    def fit(self, loader: Iterable, *, progress: bool = True, distributed: bool | None = None) -> Detector:
        """Fit on in-distribution data in one streaming pass.

        Parameters
        ----------
        loader : iterable of Tensor (N, C, H, W) or of tuples (x, y)
            In-distribution images in the model's input range; labels (N,) where the detector
            needs them. With ``distributed``, this process's shard of the data.
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
        """
        if distributed and not self.supports_distributed:
            raise ValueError(f"{type(self).__name__} cannot fit distributed; fit it on one process (distributed=False)")
        distributed = self.supports_distributed and use_distributed(distributed)
        self.input_shape_ = None
        self._fit_begin()
        shape, error = None, None
        rank = ""
        if distributed:
            import torch.distributed as dist

            rank = f" on rank {dist.get_rank()}"
        try:
            batches = self._forward_loader(loader, progress, f"fit {type(self).__name__}")
            for index, (x, logits, feats, y) in enumerate(batches):
                shape = shape or tuple(x.shape[1:])
                for name, f in feats.items():
                    if not torch.isfinite(f).all():
                        raise ValueError(f"activations of layer {name!r} in batch {index}{rank} contain NaN or inf")
                self._fit_batch(logits, feats, y)
        except Exception as err:
            if not distributed:
                raise
            error = err
        if distributed:
            shapes = sync_shards(error, shape, model_device(self.model))
            seen = sorted({s for s in shapes if s is not None})
            if not seen:
                raise ValueError("loader is empty on every rank: fit needs at least one batch of in-distribution images")
            if len(seen) > 1:
                raise ValueError(f"every rank must feed images of one shape (C, H, W); ranks saw {shapes}")
            if shape is None:  # empty shard: set up zero statistics of the right sizes
                with eval_mode(self.model), torch.no_grad(), FeatureTap(self.model, self.layers) as tap:
                    x = torch.zeros(1, *seen[0], dtype=self._model_dtype(), device=model_device(self.model))
                    self._fit_prepare(*tap(x))
                shape = seen[0]
            self._fit_reduce()
        if shape is None:
            raise ValueError("loader is empty: fit needs at least one batch of in-distribution images")
        self._fit_end()
        self.input_shape_ = shape
        return self

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
            return tap(self._check_input(x))

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
        """Accumulate one batch."""

    def _fit_end(self) -> None:
        """Turn the statistics into the learned state."""

    def _fit_prepare(self, logits: Tensor, feats: dict[str, Tensor]) -> None:
        """Set up empty statistics sized for these outputs (a rank with an empty shard)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fit distributed")

    def _fit_reduce(self) -> None:
        """All-reduce the accumulated statistics across the process group."""
        raise NotImplementedError(f"{type(self).__name__} cannot fit distributed")

    # ---- plumbing ----------------------------------------------------------------------------

    def _model_dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (N, C, H, W); got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must be a 4-D tensor (N, C, H, W); got shape {tuple(x.shape)}")
        dtype = self._model_dtype()
        if x.dtype != dtype:
            raise ValueError(f"x must have the model's dtype {dtype}; got {x.dtype}")
        if self.input_shape_ is not None and x.shape[1] != self.input_shape_[0]:
            raise ValueError(
                f"x must have C={self.input_shape_[0]} channels (as at fit time); got {x.shape[1]} in shape {tuple(x.shape)}"
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
                x = self._check_input(x)
                logits, feats = tap(x)
                yield x, logits, feats, None if y is None else y.to(device)


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
