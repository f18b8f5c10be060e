"""Save and load fitted detectors as safetensors + JSON metadata (never pickle).

Every detector of :data:`covguard.DETECTORS` is saved: the patch detectors, the baselines and a
:class:`~covguard.detectors.fused.FusedDetector` with all its members, in one file each. The
tensors depend on the detector's kind (:mod:`covguard.guardcodec`): for a patch detector the
scoring tensors (``forms/<layer>/mean|proj|gain|diag``, float64) and the layer standardization
(``standardize/mean|std``); for a baseline its ``state_tensors()`` (none for MSP, Energy,
MaxLogit, GEN, ODIN); for a fused detector each member's under ``members/<name>/`` and its
calibration scores ``calibration/<name>``. The string metadata holds:

- ``format_version`` (2 for the patch detectors, 3 for the others) and ``covguard_version``;
- ``detector`` (registry name), ``hyperparameters`` (JSON; for a fused detector the members in
  order with their own names and hyperparameters, ``rule`` and ``tail_size``), and for a patch
  detector, for reading at a glance, ``covariance`` and ``aggregation``;
- ``model``: the fingerprint of the model the detector was fitted on (JSON): tapped layer names,
  their channel counts, and the SHA-256 of the model's state dict
  (:func:`~covguard.features.parameter_sha256`);
- ``input_shape`` (C, H, W) seen at fit time (``null`` for a detector of the logits that
  recorded none);
- ``calibration`` (JSON, only in files written by :meth:`covguard.Guard.save`): the threshold
  and the target TPR it was set for;
- ``checksum``: SHA-256 of the rest of the header and of the tensor bytes.

:func:`load` first verifies the file on its own (:func:`covguard.guardfile.read_guard_file`:
size, structure, checksum, schema; any failure is a :class:`GuardFileError` naming the check),
then against the model: its tapped layers, heads and channel counts and its number of classes
(a ``ValueError`` starting with ``model does not match``) and, with ``strict_model=True``, its
parameters.

Files are byte-for-byte reproducible: the same fitted statistics give the same bytes. The
official safetensors writer lays out the tensors (sorted by dtype and name); covguard then
rewrites the JSON header with sorted keys, because the writer emits metadata in hash-map order,
which changes from one process to the next. Files are written to a temporary name and renamed,
so a crash never leaves a half-written file under ``path``.
"""

from __future__ import annotations

import copy
import json
import logging
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_bytes
from torch import nn

from covguard.detectors.base import Detector
from covguard.features import FeatureTap, eval_mode, model_device, model_dtype, parameter_sha256
from covguard.files import atomic_writer
from covguard.guardcodec import FORMAT_VERSION, build, dumps, encode, format_version, model_mismatch, module_names
from covguard.guardfile import MAX_FILE_BYTES, GuardFile, GuardFileError, checksum, read_guard_file

__all__ = ["FORMAT_VERSION", "GuardFileError", "MAX_FILE_BYTES", "attach", "check_model", "load", "read_guard_file", "read_metadata", "save"]

logger = logging.getLogger(__name__)
_ALIGN = 8  # safetensors pads its header to a multiple of 8 bytes
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def save(detector: Detector, path: str | Path, *, calibration: dict[str, Any] | None = None) -> Path:
    """Write a fitted detector to ``path`` (safetensors). Returns the path.

    Parameters
    ----------
    detector : Detector
        A fitted detector of a class in :data:`covguard.DETECTORS` (a fused detector with all
        its members).
    path : str or Path
        Destination; parent folders are created. The file gets the umask's permissions.
    calibration : dict, optional
        JSON-serializable guard calibration (:meth:`covguard.Guard.save` passes it).

    Raises
    ------
    TypeError
        A detector (or a fused detector's member) of another class, or a fused member.
    ValueError
        An unfitted detector; a detector that taps layers but recorded no input shape (fitted
        through ``partial_fit`` / ``finish_fit()`` without ``input_shape``); a member name with ``/``.
    """
    from covguard import __version__

    if not isinstance(detector, Detector):
        raise TypeError(f"detector must be a covguard Detector; got {type(detector).__name__}")
    content = encode(detector)
    if detector.layers and detector.input_shape_ is None:
        raise ValueError(
            f"{type(detector).__name__} recorded no input shape (C, H, W); fit it with fit(loader) or pass "
            "input_shape to finish_fit (or to FusedDetector.set_calibration) before saving"
        )
    fingerprint = {
        "layers": list(detector.layers),
        "channels": content.channels,
        "parameters_sha256": content.model_sha256 or parameter_sha256(detector.model),
    }
    metadata = {
        "format_version": str(format_version(content.name)),
        "covguard_version": __version__,
        "detector": content.name,
        "hyperparameters": dumps(content.params),
        "model": dumps(fingerprint),
        "input_shape": dumps(None if detector.input_shape_ is None else list(detector.input_shape_)),
    }
    if "covariance" in content.params:  # a patch detector
        metadata.update(covariance=str(content.params["covariance"]), aggregation=str(content.params["aggregate"]))
    if calibration is not None:
        metadata["calibration"] = dumps(calibration)
    data = _canonical(save_bytes(content.tensors, metadata=metadata))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as handle:
        handle.write(data)
    return path


def read_metadata(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES) -> dict[str, str]:
    """The string metadata of a covguard file, after the file is verified (checksum and schema).

    Raises
    ------
    FileNotFoundError
        ``path`` is not a file.
    GuardFileError
        As :func:`load`, for the checks that do not need the model.
    """
    return read_guard_file(path, max_bytes=max_bytes).meta


def load(
    path: str | Path, model: nn.Module, *, strict_model: bool = True, max_bytes: int = MAX_FILE_BYTES
) -> Detector:
    """Load a detector saved by :func:`save` and attach it to ``model``.

    Parameters
    ----------
    path : str or Path
    model : nn.Module
        The classifier the detector was fitted on: same tapped layers and channel counts and,
        with ``strict_model``, the same parameters (a copy converted to another float dtype,
        e.g. ``model.double()``, is the same model if it converts back to the fitted weights).
    strict_model : bool, default True
        Refuse a model whose parameters (state dict) differ from those at fit time. False
        accepts it (e.g. a fine-tuned copy) with a warning: the fitted statistics may no longer
        describe its features.
    max_bytes : int
        Largest file accepted (default :data:`MAX_FILE_BYTES`, 4 GiB).

    Returns
    -------
    Detector
        Of the class the file names, fitted; a fused detector with every member rebuilt and its
        calibration set.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``.
    FileNotFoundError
        ``path`` is not a file.
    GuardFileError
        A file that is too large, truncated, not safetensors, corrupted (checksum), of format 1
        or newer than this covguard, or whose content breaks the schema (see
        :mod:`covguard.guardfile`). A subclass of ValueError.
    ValueError
        A model whose tapped layers, ``fc_layer``, channel counts or classes differ
        (``model does not match ...``), or whose parameters differ (``model parameters differ ...``).
    """
    check_model(model)
    return attach(read_guard_file(path, max_bytes=max_bytes), model, strict_model=strict_model, where=f"path {str(path)!r}")


def check_model(model: Any) -> None:
    """TypeError unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the detector was fitted on; got {type(model).__name__}")


def attach(content: GuardFile, model: nn.Module, *, strict_model: bool, where: str) -> Detector:
    """Build the detector of a verified file on ``model``, after checking that ``model`` matches it."""
    names = {name for name, _ in model.named_modules() if name}
    needed = module_names(content.detector, content.params)
    for role in ("tapped layer", "fc_layer"):
        absent = [key for key, r in needed.items() if r == role and key not in names]
        if absent:
            raise ValueError(f"model does not match the saved detector: its {role}s {absent} are not modules of the model")
    try:
        detector = build(
            content.detector, content.params, content.tensors, model, channels=content.channels,
            input_shape=content.input_shape, model_sha256=content.parameters_sha256,
        )  # fmt: skip
    except ValueError as err:
        raise GuardFileError(f"{where} has {err}") from err
    _check_model(model, detector, content)
    _check_parameters(model, content.parameters_sha256, strict_model, where)
    return detector


# ---- model checks --------------------------------------------------------------------------------


def _check_model(model: nn.Module, detector: Detector, content: GuardFile) -> None:
    """One forward on zeros of the fitted shape: channel counts of the tapped layers, and classes."""
    if content.input_shape is None:  # a detector of the logits alone, never fitted on images
        return
    dtype = model_dtype(model)
    x = torch.zeros(1, *content.input_shape, dtype=dtype, device=model_device(model))
    try:
        with eval_mode(model), torch.no_grad(), FeatureTap(model, detector.layers) as tap:
            logits, feats = tap(x)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"model does not match the saved detector: it cannot run the fitted input shape {content.input_shape}: {err}"
        ) from err
    channels = content.channels
    wrong = {layer: (channels[layer], f.shape[1] if f.ndim > 1 else None) for layer, f in feats.items() if f.ndim < 2 or f.shape[1] != channels[layer]}
    if wrong:
        detail = ", ".join(f"{layer!r}: fitted C={a}, model C={b}" for layer, (a, b) in wrong.items())
        raise ValueError(f"model does not match the saved detector ({detail})")
    reason = model_mismatch(detector, logits.shape[-1])
    if reason:
        raise ValueError(f"model does not match the saved detector: {reason}")


def _check_parameters(model: nn.Module, expected: str, strict_model: bool, where: str) -> None:
    """Compare the state dict's SHA-256 with the fitted one, also after conversion to another float dtype."""
    actual = parameter_sha256(model)
    if actual == expected:
        return
    dtypes = sorted({str(t.dtype) for t in model.state_dict().values() if t.is_floating_point()})
    for dtype in _FLOATS:
        if [str(dtype)] != dtypes and parameter_sha256(copy.deepcopy(model).to(dtype)) == expected:
            logger.info("model parameters (%s) equal the fitted ones after conversion to %s", dtypes, dtype)
            return
    message = (
        f"model parameters differ from those the detector in {where} was fitted on "
        f"(state dict sha256 {actual[:12]}..., fitted {expected[:12]}...; also compared after converting the "
        f"model's {'/'.join(dtypes) or 'no'} floats to float32, float64, float16 and bfloat16)"
    )
    if strict_model:
        raise ValueError(f"{message}; pass strict_model=False to accept a fine-tuned model")
    warnings.warn(f"{message}; scores may not be calibrated for this model", RuntimeWarning, stacklevel=4)


# ---- writing ---------------------------------------------------------------------------------------


def _canonical(raw: bytes) -> bytes:
    """Rewrite a safetensors file (from the official writer) with a sorted-key header carrying the checksum."""
    (size,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    header["__metadata__"]["checksum"] = checksum(header, data)
    text = dumps(header).encode()
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text + data
