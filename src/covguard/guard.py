"""Deploy a detector in front of a classifier: predict, score, and flag with a calibrated threshold.

``Guard(model, detector).calibrate(loader, tpr=0.95)`` sets the threshold on held-out
in-distribution images so that a fraction ``tpr`` of them is accepted (in-distribution is the
positive class, as in OpenOOD's FPR@95%TPR); ``guard(x)`` then returns the predicted class, the
score and a boolean ``flagged`` per image. An image whose activations are not finite scores +inf
and is flagged.

The calibration is saved in the detector's own file (``calibration`` metadata, see
:mod:`covguard.persistence`): ``guard.save(path)`` writes it, :func:`load_guard` reads it back;
:func:`covguard.load` reads the same file as a plain detector.

Image files to score are read by :mod:`covguard.imagefiles` (``iter_images``, ``decode_image``,
re-exported here).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from covguard.detectors.base import Detector, check_is_fitted
from covguard.imagefiles import IMAGE_SUFFIXES, decode_image, iter_images

__all__ = ["IMAGE_SUFFIXES", "Calibration", "Guard", "GuardResult", "decode_image", "iter_images", "load_guard"]

_MIN_SE = 0.01  # warn when the calibration's TPR standard error exceeds one point


@dataclass(frozen=True)
class GuardResult:
    """What a :class:`Guard` says about a batch of N images.

    Attributes
    ----------
    predictions : Tensor of shape (N,), int64
        The model's predicted class.
    scores : Tensor of shape (N,)
        Detector scores; larger = more anomalous.
    flagged : Tensor of shape (N,), bool
        True where the score exceeds the threshold (or is not a number): do not trust the prediction.
    """

    predictions: Tensor
    scores: Tensor
    flagged: Tensor


@dataclass(frozen=True)
class Calibration:
    """A threshold on held-out in-distribution scores.

    Attributes
    ----------
    threshold : float
        Images scoring above it are flagged.
    tpr : float
        Target fraction of in-distribution images accepted (score <= threshold).
    n : int
        Number of calibration images.
    achieved_tpr : float
        Fraction of the calibration images accepted (>= ``tpr``; ties may raise it).
    """

    threshold: float
    tpr: float
    n: int
    achieved_tpr: float

    @classmethod
    def from_scores(cls, scores: Tensor, tpr: float) -> Calibration:
        """Threshold = the ``ceil(tpr * n)``-th smallest score of ``scores`` (N,), all finite."""
        s = scores.detach().double().cpu().flatten().sort().values  # (n,)
        n = s.numel()
        k = min(max(math.ceil(tpr * n - 1e-9), 1), n)
        threshold = float(s[k - 1])
        return cls(threshold=threshold, tpr=float(tpr), n=n, achieved_tpr=float((s <= threshold).double().mean()))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Calibration:
        """The calibration of a saved guard, validated.

        Raises
        ------
        ValueError
            Other keys than ``threshold, tpr, n, achieved_tpr``; a threshold that is not a
            finite number; ``tpr`` outside (0, 1]; ``n`` not a positive integer;
            ``achieved_tpr`` outside [0, 1].
        """
        names = [f.name for f in cls.__dataclass_fields__.values()]
        if not isinstance(values, dict) or sorted(values) != sorted(names):
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"calibration must hold exactly {names}; got {got}")
        threshold, tpr, n, achieved = (values[name] for name in names)
        real = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (threshold, tpr, achieved))
        if not real or not math.isfinite(threshold):
            raise ValueError(f"calibration threshold, tpr and achieved_tpr must be finite numbers; got {values}")
        if not 0.0 < tpr <= 1.0 or not 0.0 <= achieved <= 1.0:
            raise ValueError(f"calibration tpr must be in (0, 1] and achieved_tpr in [0, 1]; got {tpr}, {achieved}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"calibration n must be a positive integer; got {n!r}")
        return cls(float(threshold), float(tpr), n, float(achieved))


class Guard:
    """A classifier with an out-of-distribution / adversarial guard.

    Parameters
    ----------
    model : nn.Module
        The classifier, images (N, C, H, W) -> logits (N, K).
    detector : Detector
        A fitted detector built on ``model`` (larger score = more anomalous).

    Attributes
    ----------
    calibration_ : Calibration or None
        Set by :meth:`calibrate` or :func:`load_guard`.

    Examples
    --------
    >>> det = cg.SimpleMahalanobis(model, layers=["block2"]).fit(train_loader)    # doctest: +SKIP
    >>> guard = cg.Guard(model, det).calibrate(val_loader, tpr=0.95)              # doctest: +SKIP
    >>> out = guard(x)                                                             # doctest: +SKIP
    >>> out.predictions[~out.flagged]          # the predictions to trust           # doctest: +SKIP
    >>> guard.save("guard.safetensors"); guard = cg.load_guard("guard.safetensors", model)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, detector: Detector) -> None:
        if not isinstance(detector, Detector):
            raise TypeError(f"detector must be a covguard Detector; got {type(detector).__name__}")
        if detector.model is not model:
            raise ValueError(
                "detector must be built on the same model object as the guard (detector.model is not model)"
            )
        self.model = model
        self.detector = detector
        self.calibration_: Calibration | None = None

    @property
    def threshold_(self) -> float:
        """The calibrated threshold; raises if :meth:`calibrate` has not run."""
        if self.calibration_ is None:
            raise ValueError(
                "the guard is not calibrated yet; call calibrate(loader, tpr=...) on held-out in-distribution data"
            )
        return self.calibration_.threshold

    def calibrate(self, loader: Iterable, *, tpr: float = 0.95, progress: bool = True) -> Guard:
        """Set the threshold that accepts a fraction ``tpr`` of held-out in-distribution images.

        Parameters
        ----------
        loader : iterable of Tensor (N, C, H, W) or of tuples (x, y)
            Held-out in-distribution images, not those the detector was fitted on.
        tpr : float, default 0.95
            Target true-positive rate (in-distribution accepted), in (0, 1].
        progress : bool
            Show a progress bar.

        Returns
        -------
        Guard
            ``self``.

        Raises
        ------
        TypeError
            ``tpr`` is not a number.
        ValueError
            ``tpr`` outside (0, 1]; an unfitted detector; an empty loader; images whose scores
            are not finite (their activations are not: remove them).
        """
        if isinstance(tpr, bool) or not isinstance(tpr, numbers.Real):
            raise TypeError(f"tpr must be a number in (0, 1]; got {type(tpr).__name__} {tpr!r}")
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"tpr must be in (0, 1]; got {tpr}")
        check_is_fitted(self.detector)
        scores = self.detector.score_loader(loader, progress=progress)  # (n,)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{len(bad)} of {scores.numel()} calibration images (positions {bad[:10]}) have non-finite scores; "
                "calibration needs finite in-distribution images"
            )
        se = math.sqrt(tpr * (1 - tpr) / scores.numel())
        if se > _MIN_SE:
            warnings.warn(
                f"calibrating on {scores.numel()} images: the TPR on new data will vary by about +-{100 * se:.1f} points "
                "(one standard error); use more held-out images",
                UserWarning,
                stacklevel=2,
            )
        self.calibration_ = Calibration.from_scores(scores, tpr)
        return self

    @torch.no_grad()
    def __call__(self, x: Tensor) -> GuardResult:
        """Predict, score and flag a batch.

        Parameters
        ----------
        x : Tensor of shape (N, C, H, W)
            Images in the model's input range and dtype.

        Returns
        -------
        GuardResult
            ``predictions`` (N,), ``scores`` (N,), ``flagged`` (N,) on the model's device.

        Warns
        -----
        UserWarning
            ``x`` has another height or width than the images the detector was fitted on: its
            scores are not calibrated (resize the images to the fitted size).
        """
        threshold = self.threshold_
        logits, scores = self.detector.logits_and_scores(x)
        flagged = ~(scores.double() <= threshold)  # NaN would be flagged too
        return GuardResult(predictions=logits.argmax(1), scores=scores, flagged=flagged)

    def save(self, path: str | Path) -> Path:
        """Write the detector and its calibration to one safetensors file; read it with :func:`load_guard`."""
        from covguard.persistence import save

        if self.calibration_ is None:
            raise ValueError("the guard is not calibrated yet; call calibrate(loader, tpr=...) before save")
        return save(self.detector, path, calibration=asdict(self.calibration_))

    def export(self, path: str | Path, *, format: str = "onnx", opset: int = 17) -> Path:
        """Write the model and this guard as one graph: ``images`` (N, C, H, W) in [0, 1] ->
        ``logits`` (N, K), ``score`` (N,), ``flagged`` (N,); see :func:`covguard.export.export_guard`.

        ``format`` is ``"onnx"`` (needs ``pip install 'covguard[export]'``) or ``"torchscript"``.
        """
        from covguard.export import export_guard

        return export_guard(self, path, format=format, opset=opset)


def load_guard(path: str | Path, model: nn.Module, *, strict_model: bool = True, max_bytes: int | None = None) -> Guard:
    """Load a guard saved by :meth:`Guard.save`.

    The whole file is verified (size, checksum, schema) before anything in it is used, then the
    calibration, then the model (as :func:`covguard.load`).

    Parameters
    ----------
    path : str or Path
    model : nn.Module
        The classifier the detector was fitted on.
    strict_model : bool, default True
        As :func:`covguard.load`: refuse a model whose parameters differ.
    max_bytes : int, optional
        Largest file accepted (default :data:`covguard.persistence.MAX_FILE_BYTES`).

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``.
    covguard.persistence.GuardFileError
        (a ValueError) The file holds no calibration (a detector saved without a guard) or an
        invalid one, or as :func:`covguard.load`.
    ValueError
        A model that does not match, as :func:`covguard.load`.
    """
    from covguard.persistence import MAX_FILE_BYTES, GuardFileError, attach, check_model, read_guard_file

    check_model(model)
    content = read_guard_file(path, max_bytes=MAX_FILE_BYTES if max_bytes is None else max_bytes)
    where = f"path {str(path)!r}"
    if content.calibration is None:
        raise GuardFileError(
            f"{where} holds a detector without a guard calibration; "
            "calibrate it with Guard(model, detector).calibrate(loader) and save the guard"
        )
    try:
        calibration = Calibration.from_dict(content.calibration)
    except ValueError as err:
        raise GuardFileError(f"{where} has invalid content: {err}") from err
    guard = Guard(model, attach(content, model, strict_model=strict_model, where=where))
    guard.calibration_ = calibration
    return guard
