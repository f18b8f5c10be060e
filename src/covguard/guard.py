"""Deploy a detector in front of a classifier: predict, score, and flag with a calibrated threshold.

``Guard(model, detector).calibrate(loader, tpr=0.95)`` sets the threshold on held-out
in-distribution images so that a fraction ``tpr`` of them is accepted (in-distribution is the
positive class, as in OpenOOD's FPR@95%TPR); ``guard(x)`` then returns the predicted class, the
score and a boolean ``flagged`` per image. An image whose activations are not finite scores +inf
and is flagged.

The calibration is saved in the detector's own file (``calibration`` metadata, see
:mod:`covguard.persistence`): ``guard.save(path)`` writes it, :func:`load_guard` reads it back;
:func:`covguard.load` reads the same file as a plain detector.

This module also reads image files for scoring (``covguard score``): a folder (recursive), a tar
archive (any compression, read in place) or a single file, decoded with PIL, converted to the
model's input channels (``L`` for 1, ``RGB`` for 3), resized to the fitted input size with
bilinear interpolation (no crop: the aspect ratio is not kept) and scaled to float32 ``[0, 1]``.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from covguard.detectors.base import Detector, check_is_fitted

__all__ = ["IMAGE_SUFFIXES", "Calibration", "Guard", "GuardResult", "decode_image", "iter_images", "load_guard"]

#: Suffixes (lower case) that :func:`iter_images` reads from a folder or an archive.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
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
    def from_dict(cls, values: dict) -> Calibration:
        return cls(float(values["threshold"]), float(values["tpr"]), int(values["n"]), float(values["achieved_tpr"]))


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
        ValueError
            ``tpr`` outside (0, 1]; an unfitted detector; an empty loader; images whose scores
            are not finite (their activations are not: remove them).
        """
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


def load_guard(path: str | Path, model: nn.Module, *, strict_model: bool = True) -> Guard:
    """Load a guard saved by :meth:`Guard.save`.

    Parameters
    ----------
    path : str or Path
    model : nn.Module
        The classifier the detector was fitted on.
    strict_model : bool, default True
        As :func:`covguard.load`: refuse a model whose parameters differ.

    Raises
    ------
    ValueError
        The file holds no calibration (a detector saved without a guard), or as :func:`covguard.load`.
    """
    from covguard.persistence import load, read_metadata

    meta = read_metadata(path)
    if "calibration" not in meta:
        raise ValueError(
            f"path {str(path)!r} holds a detector without a guard calibration; "
            "calibrate it with Guard(model, detector).calibrate(loader) and save the guard"
        )
    calibration = Calibration.from_dict(json.loads(meta["calibration"]))
    guard = Guard(model, load(path, model, strict_model=strict_model))
    guard.calibration_ = calibration
    return guard


# ---- reading image files to score ------------------------------------------------------------


def iter_images(source: str | Path) -> tuple[int, Iterator[tuple[str, bytes]]]:
    """List the images of a folder (recursive), a tar archive or a single file.

    Parameters
    ----------
    source : str or Path
        A folder (files with a suffix in :data:`IMAGE_SUFFIXES`, at any depth, in sorted path
        order), a tar archive (``.tar``, ``.tar.gz``, ... the same files in sorted member order,
        read in place), or one image file.

    Returns
    -------
    total : int
        Number of images.
    images : iterator of (str, bytes)
        The name (path relative to the folder, member name, or the file path) and encoded bytes.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return len(files), ((p.relative_to(source).as_posix(), p.read_bytes()) for p in files)
    if not source.is_file():
        raise FileNotFoundError(f"images {str(source)!r} is neither a folder nor a file")
    if tarfile.is_tarfile(source):
        with tarfile.open(source, mode="r:*") as archive:
            members = sorted(
                (m for m in archive.getmembers() if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES),
                key=lambda m: m.name,
            )

        def read_tar() -> Iterator[tuple[str, bytes]]:
            with tarfile.open(source, mode="r:*") as archive:
                for member in members:
                    handle = archive.extractfile(member)
                    yield member.name, b"" if handle is None else handle.read()

        return len(members), read_tar()
    return 1, iter([(str(source), source.read_bytes())])


def decode_image(data: bytes, *, channels: int, size: tuple[int, int]) -> Tensor:
    """Decode an encoded image to float32 ``[0, 1]`` pixels of the model's input format.

    Parameters
    ----------
    data : bytes
        PNG, JPEG, ... anything PIL reads.
    channels : {1, 3}
        1: ``convert("L")`` (ITU-R 601-2 luma); 3: ``convert("RGB")`` (grey replicated, alpha dropped).
    size : (int, int)
        Output (H, W); the image is resized with bilinear interpolation (PIL ``BILINEAR``),
        without cropping.

    Returns
    -------
    Tensor of shape (channels, H, W), float32

    Raises
    ------
    ValueError
        If PIL cannot decode ``data`` or ``channels`` is not 1 or 3.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB) to read image files; got {channels}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, 3)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image ({type(err).__name__}: {err})") from err
    x = torch.from_numpy(pixels.copy()).float().div_(255.0)
    return x[None] if channels == 1 else x.permute(2, 0, 1).contiguous()  # (C, H, W)
