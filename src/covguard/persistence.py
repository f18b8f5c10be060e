"""Save and load fitted patch detectors as safetensors + JSON metadata (never pickle).

The file holds the scoring tensors (``forms/<layer>/mean|proj|gain|diag``, float64) and the
layer standardization (``standardize/mean|std``). Its string metadata holds:

- ``format_version`` (:data:`FORMAT_VERSION`) and ``covguard_version``;
- ``detector`` (registry name), ``hyperparameters`` (JSON), and for reading at a glance
  ``covariance`` and ``aggregation``;
- ``model``: the fingerprint of the model the detector was fitted on (JSON): tapped layer names,
  their channel counts, and the SHA-256 of the model's state dict
  (:func:`~covguard.detectors.base.parameter_sha256`);
- ``input_shape`` (C, H, W) seen at fit time;
- ``calibration`` (JSON, only in files written by :meth:`covguard.Guard.save`): the threshold
  and the target TPR it was set for;
- ``checksum``: SHA-256 of the rest of the header and of the tensor bytes.

:func:`load` refuses, saying which check failed: a file that is not safetensors or is truncated,
a newer format, an unknown detector, missing tensors, a checksum mismatch (corruption), a model
whose tapped layers or channel counts differ, and (``strict_model=True``) a model whose
parameters differ from the fitted ones.

Files are byte-for-byte reproducible: the same fitted statistics give the same bytes. The
official safetensors writer lays out the tensors (sorted by dtype and name); covguard then
rewrites the JSON header with sorted keys, because the writer emits metadata in hash-map order,
which changes from one process to the next. Files are written to a temporary name and renamed,
so a crash never leaves a half-written file under ``path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from covguard.covariance import QuadraticForm
from covguard.detectors import DETECTORS
from covguard.detectors.base import check_is_fitted
from covguard.detectors.patch import PatchMahalanobis
from covguard.features import FeatureTap, eval_mode, model_device, parameter_sha256

__all__ = ["FORMAT_VERSION", "load", "read_metadata", "save"]

#: Version 2 added the model fingerprint, the checksum and the calibration; version 1 files
#: (no fingerprint, no checksum) are still read, with a warning.
FORMAT_VERSION = 2
_FIELDS = ("mean", "proj", "gain", "diag")
_ALIGN = 8  # safetensors pads its header to a multiple of 8 bytes


def save(detector: PatchMahalanobis, path: str | Path, *, calibration: dict[str, Any] | None = None) -> Path:
    """Write a fitted detector to ``path`` (safetensors). Returns the path.

    Parameters
    ----------
    detector : PatchMahalanobis
        A fitted detector from :data:`covguard.DETECTORS`.
    path : str or Path
        Destination; parent folders are created.
    calibration : dict, optional
        JSON-serializable guard calibration (:meth:`covguard.Guard.save` passes it).
    """
    from covguard import __version__

    check_is_fitted(detector)
    name = next((key for key, cls in DETECTORS.items() if type(detector) is cls), None)
    if name is None:
        raise TypeError(f"detector must be one of {sorted(DETECTORS)} to be saved; got {type(detector).__name__}")
    tensors = {"standardize/mean": detector.score_mean_, "standardize/std": detector.score_std_}
    for layer, form in detector.forms_.items():
        for field in _FIELDS:
            value = getattr(form, field)
            if value is not None:
                tensors[f"forms/{layer}/{field}"] = value.detach().cpu().contiguous()
    params = detector.get_params()
    fingerprint = {
        "layers": list(detector.layers),
        "channels": detector.channels_,
        "parameters_sha256": detector.model_sha256_ or parameter_sha256(detector.model),
    }
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "covguard_version": __version__,
        "detector": name,
        "hyperparameters": _dumps(params),
        "covariance": str(params.get("covariance", "")),
        "aggregation": str(params.get("aggregate", "")),
        "model": _dumps(fingerprint),
        "input_shape": _dumps(list(detector.input_shape_)),
    }
    if calibration is not None:
        metadata["calibration"] = _dumps(calibration)
    data = _canonical(save_bytes(tensors, metadata=metadata))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a covguard file, read from its header alone (fast).

    The checksum of the content is not verified here; :func:`load` verifies it.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file; a header that cannot be parsed; a newer format version.
    """
    path = Path(path)
    where = f"path {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    with path.open("rb") as handle:
        head = handle.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        raw = head + handle.read(min(size, path.stat().st_size))
    try:
        header, _ = _split(raw)
    except ValueError as err:
        raise ValueError(f"{where} is not a readable safetensors file, or it is truncated or corrupted: {err}") from err
    meta = header.get("__metadata__") or {}
    _check_version(where, meta)
    return meta


def load(path: str | Path, model: nn.Module, *, strict_model: bool = True) -> PatchMahalanobis:
    """Load a detector saved by :func:`save` and attach it to ``model``.

    Parameters
    ----------
    path : str or Path
    model : nn.Module
        The classifier the detector was fitted on: same tapped layers and channel counts and,
        with ``strict_model``, the same parameters.
    strict_model : bool, default True
        Refuse a model whose parameters (state dict) differ from those at fit time. False
        accepts it (e.g. a fine-tuned copy) with a warning: the fitted statistics may no longer
        describe its features.

    Raises
    ------
    FileNotFoundError, ValueError
        Each message names the failed check: missing file; not a safetensors file, truncated
        or corrupted (checksum); newer format version; unknown detector; missing tensors; a
        model whose tapped layers or channel counts differ; a model whose parameters differ.
    """
    path = Path(path)
    meta, tensors, header, data = _read(path)
    where = f"path {str(path)!r}"
    if meta.get("detector") not in DETECTORS:
        raise ValueError(f"{where} holds detector {meta.get('detector')!r}; known: {sorted(DETECTORS)}")
    try:
        params = json.loads(meta["hyperparameters"])
        if int(meta["format_version"]) >= 2:
            fingerprint = json.loads(meta["model"])
            channels = fingerprint["channels"]
        else:
            fingerprint, channels = {}, json.loads(meta["channels"])
        channels = {layer: int(c) for layer, c in channels.items()}
        input_shape = tuple(int(v) for v in json.loads(meta["input_shape"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where} has missing or malformed metadata ({type(err).__name__}: {err})") from err
    cls = DETECTORS[meta["detector"]]
    layers = params.get("layers", [])
    names = {name for name, _ in model.named_modules() if name}
    absent = [layer for layer in layers if layer not in names]
    if absent:
        raise ValueError(
            f"model does not match the saved detector: its tapped layers {absent} are not modules of the model"
        )
    detector = cls(model, **params)
    forms = {}
    for layer in detector.layers:
        found = {field: tensors.get(f"forms/{layer}/{field}") for field in _FIELDS}
        if found["mean"] is None or (found["proj"] is None and found["diag"] is None):
            raise ValueError(f"{where} is missing the tensors of layer {layer!r}")
        forms[layer] = QuadraticForm(**found)
    for key in ("standardize/mean", "standardize/std"):
        if key not in tensors:
            raise ValueError(f"{where} is missing tensor {key!r}")
    _verify(path, meta, header, data)
    _check_model(model, detector.layers, channels, input_shape)
    expected = fingerprint.get("parameters_sha256")
    if expected is not None:
        actual = parameter_sha256(model)
        if actual != expected:
            message = (
                f"model parameters differ from those the detector in {where} was fitted on "
                f"(state dict sha256 {actual[:12]}..., fitted {expected[:12]}...)"
            )
            if strict_model:
                raise ValueError(f"{message}; pass strict_model=False to accept a fine-tuned model")
            warnings.warn(f"{message}; scores may not be calibrated for this model", RuntimeWarning, stacklevel=2)
    detector.set_state(
        forms, channels, score_mean=tensors["standardize/mean"], score_std=tensors["standardize/std"],
        input_shape=input_shape, model_sha256=expected,
    )
    return detector


# ---- file format ---------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _checksum(header: dict, data: bytes) -> str:
    """SHA-256 of the canonical header (without the checksum itself) and the tensor bytes."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "checksum"}
    digest = hashlib.sha256(_dumps({**header, "__metadata__": meta}).encode())
    digest.update(data)
    return digest.hexdigest()


def _pack(header: dict, data: bytes) -> bytes:
    text = _dumps(header).encode()
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text + data


def _split(raw: bytes) -> tuple[dict, bytes]:
    """Header dict and tensor bytes of a safetensors file; ValueError if it cannot be parsed."""
    if len(raw) < 8:
        raise ValueError(f"it is {len(raw)} bytes long, shorter than a safetensors header")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > len(raw) - 8:
        raise ValueError(f"its header claims {size} bytes but the file holds {len(raw) - 8} after the length field")
    try:
        header = json.loads(raw[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, raw[8 + size :]


def _canonical(raw: bytes) -> bytes:
    """Rewrite a safetensors file with a sorted-key header that carries the checksum."""
    header, data = _split(raw)
    header["__metadata__"]["checksum"] = _checksum(header, data)
    return _pack(header, data)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor], dict, bytes]:
    """Metadata, tensors, header and tensor bytes of a covguard file; checks it parses and its version."""
    where = f"path {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    raw = path.read_bytes()
    try:
        header, data = _split(raw)
        tensors = load_bytes(raw)
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"{where} is not a readable safetensors file, or it is truncated or corrupted: {err}") from err
    meta = header.get("__metadata__") or {}
    _check_version(where, meta)
    return meta, tensors, header, data


def _check_version(where: str, meta: dict[str, str]) -> None:
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = 0
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where} has format version {version}, newer than this covguard reads ({FORMAT_VERSION}); upgrade covguard"
        )
    if version < 1:
        raise ValueError(f"{where} is not a covguard detector file (no format_version in its metadata)")


def _verify(path: Path, meta: dict[str, str], header: dict, data: bytes) -> None:
    """Compare the stored checksum with the content (format 2 and later)."""
    if int(meta["format_version"]) == 1:
        warnings.warn(
            f"path {str(path)!r} was written by an older covguard (format 1): it has no checksum or model "
            "fingerprint to verify; save it again to upgrade",
            RuntimeWarning,
            stacklevel=3,
        )
    elif meta.get("checksum") != _checksum(header, data):
        raise ValueError(f"path {str(path)!r} is corrupted: its checksum does not match its content")


def _check_model(model: nn.Module, layers: tuple[str, ...], channels: dict[str, int], input_shape: tuple) -> None:
    """Run one forward on zeros and compare the tapped layers' channel counts with the fitted ones."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros(1, *input_shape, dtype=dtype, device=model_device(model))
    try:
        with eval_mode(model), torch.no_grad(), FeatureTap(model, layers) as tap:
            _, feats = tap(x)
    except RuntimeError as err:
        raise ValueError(
            f"model does not match the saved detector: it cannot run the fitted input shape {input_shape}: {err}"
        ) from err
    wrong = {
        layer: (channels.get(layer), f.shape[1]) for layer, f in feats.items() if f.shape[1] != channels.get(layer)
    }
    if wrong:
        detail = ", ".join(f"{layer!r}: fitted C={a}, model C={b}" for layer, (a, b) in wrong.items())
        raise ValueError(f"model does not match the saved detector ({detail})")
