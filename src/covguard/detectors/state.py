"""The learned state of a baseline detector as named tensors: what a covguard file holds for it.

Every detector of :data:`~covguard.detectors.baselines.BASELINES` derives from
:class:`TensorStateDetector` and so follows one protocol:

- ``state_spec`` (class attribute): name -> (dtype, shape) of each learned tensor. A shape entry
  is an ``int`` (that size exactly) or a letter bound by the first tensor that uses it and
  required equal wherever else it occurs; ``"C"`` is the channel count of ``feature_layer``.
  Empty for the detectors without learned state (MSP, Energy, MaxLogit, GEN, ODIN).
- :meth:`~TensorStateDetector.state_tensors` returns the fitted tensors (CPU, contiguous).
- :meth:`~TensorStateDetector.set_state_tensors` validates tensors against the spec
  (:meth:`~TensorStateDetector.check_state`: names, dtypes, consistent shapes, finite values,
  then the class's own value checks) and installs them: the detector is then fitted, as if
  ``fit`` had produced them, and scores bit-identically.
- :meth:`~TensorStateDetector.check_model` refuses a model whose class count or head does not
  fit the state (ViM's head, MDS's class labels, ReAct's head input).

Subclasses implement ``_state()`` and ``_install_state(tensors, dims)``; the hyperparameters
are the constructor's (``get_params``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from covguard.detectors.base import Detector, check_is_fitted
from covguard.features import model_device

__all__ = ["StateSpec", "TensorStateDetector", "check_state"]

#: name -> (dtype, shape); a shape entry is a size or a letter naming a size.
StateSpec = dict[str, tuple[torch.dtype, tuple[str | int, ...]]]


def check_state(spec: StateSpec, tensors: Mapping[str, Any], *, channels: int | None = None) -> dict[str, int]:
    """Validate named tensors against a spec; returns the size bound to each letter.

    Parameters
    ----------
    spec : StateSpec
    tensors : mapping of str to Tensor
    channels : int, optional
        ``C``, the channel count the tensors must agree with (e.g. the model fingerprint's).

    Raises
    ------
    ValueError
        Missing or unexpected names, another dtype, another number of dimensions, a size that
        disagrees with the spec or with an earlier tensor, a size 0, NaN or inf.
    """
    missing, unexpected = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
    if missing or unexpected:
        raise ValueError(f"state tensors missing {missing}, unexpected {unexpected}; expected {sorted(spec)}")
    dims: dict[str, int] = {}
    origin: dict[str, str] = {}
    if channels is not None:
        dims["C"], origin["C"] = channels, "the model's channel count"
    for name, (dtype, shape) in spec.items():
        t = tensors[name]
        if not isinstance(t, Tensor):
            raise ValueError(f"tensor {name!r} must be a Tensor; got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"tensor {name!r} must be {dtype}; got {t.dtype}")
        expected = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        if t.ndim != len(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}; expected {expected}")
        for symbol, size in zip(shape, t.shape):
            if isinstance(symbol, int):
                want = symbol
            else:
                want = dims.setdefault(symbol, size)
                origin.setdefault(symbol, f"tensor {name!r}")
            if size != want or size < 1:
                source = "" if isinstance(symbol, int) else f" with {symbol}={want} from {origin[symbol]}"
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}; expected {expected}{source}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tensor {name!r} holds NaN or inf")
    return dims


class TensorStateDetector(Detector):
    """A detector whose learned state is a dict of tensors described by ``state_spec``.

    See the module docstring for the protocol. A detector with an empty ``state_spec`` needs no
    fit; :meth:`set_state_tensors` with ``{}`` only records the input shape.
    """

    #: name -> (dtype, shape) of the learned tensors; see :func:`check_state`.
    state_spec: ClassVar[StateSpec] = {}

    def state_tensors(self) -> dict[str, Tensor]:
        """The learned tensors, named as in ``state_spec``, detached, on the CPU and contiguous."""
        check_is_fitted(self)
        return {name: t.detach().cpu().contiguous() for name, t in self._state().items()}

    def set_state_tensors(
        self, tensors: Mapping[str, Tensor], *, input_shape: tuple[int, int, int] | None = None
    ) -> TensorStateDetector:
        """Install a learned state (as :mod:`covguard.persistence` reads it from a file).

        Parameters
        ----------
        tensors : mapping of str to Tensor
            As returned by :meth:`state_tensors`; copied onto the model's device.
        input_shape : tuple (C, H, W), optional
            The images' shape at fit time.

        Returns
        -------
        TensorStateDetector
            ``self``, fitted.

        Raises
        ------
        ValueError
            Tensors that break ``state_spec`` or the class's value checks (:meth:`check_state`).
        """
        dims = self.check_state(tensors)
        device = model_device(self.model)
        self._install_state({name: t.detach().to(device, copy=True) for name, t in tensors.items()}, dims)
        self.input_shape_ = None if input_shape is None else tuple(int(v) for v in input_shape)
        self.fitted_ = True
        return self

    @classmethod
    def check_state(cls, tensors: Mapping[str, Tensor], *, channels: int | None = None) -> dict[str, int]:
        """:func:`check_state` against ``state_spec``, then the class's value checks; returns the sizes."""
        dims = check_state(cls.state_spec, tensors, channels=channels)
        cls._check_state_values(tensors, dims)
        return dims

    def check_model(self, classes: int) -> None:
        """Raise ValueError, with the reason, if a model with ``classes`` outputs cannot use this state."""

    # ---- hooks ---------------------------------------------------------------------------------

    def _state(self) -> dict[str, Tensor]:
        """The learned tensors by name (fitted)."""
        return {}

    def _install_state(self, tensors: dict[str, Tensor], dims: dict[str, int]) -> None:
        """Set the learned attributes from validated tensors and the sizes of their letters."""

    @classmethod
    def _check_state_values(cls, tensors: Mapping[str, Tensor], dims: dict[str, int]) -> None:
        """Value checks beyond the spec (raise ValueError naming the tensor)."""
