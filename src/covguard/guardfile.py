"""Read a covguard detector file and verify it before anything in it is trusted.

:func:`read_guard_file` runs the checks in this order, each refusing with a
:class:`GuardFileError` (a ``ValueError``) whose message names the check:

1. **size**: the file is at most ``max_bytes`` (default :data:`MAX_FILE_BYTES`); its header
   length field is at most :data:`MAX_HEADER_BYTES`; the file is exactly as long as its header
   says (no missing or appended bytes). Nothing larger than the file is ever allocated.
2. **structure**: the header is a JSON object nested at most :data:`MAX_JSON_DEPTH` deep
   (checked on the raw text before parsing, so no recursion error), with string metadata and
   well-formed tensor entries (known dtype, shape, contiguous offsets that match the sizes).
3. **checksum**: SHA-256 of the canonical header and the tensor bytes. A file whose checksum
   does not match is refused as corrupted (or as newer, if it says so); format 1 files, which
   have no checksum, are refused. Formats 2 (patch detectors) and 3 (also baselines and fused
   detectors) are read.
4. **schema**: the metadata keys, the JSON they hold (detector, hyperparameters, input shape,
   model fingerprint with its layers and channels), and every tensor, by the detector's kind
   (:func:`covguard.guardcodec.check_content`): expected names only, dtypes, shapes that agree
   with each other and with the channels (and kernel sizes), finite values, positive weights and
   deviations; for a fused detector, each member's tensors and calibration scores, the error
   naming the member.

What needs the model (tapped layers, channel counts, weights) is checked by
:func:`covguard.persistence.load`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from covguard.detectors import DETECTORS
from covguard.files import format_bytes
from covguard.guardcodec import FORMAT_VERSION, check_content, dumps, format_version, positive_int

__all__ = ["FORMAT_VERSION", "GuardFile", "GuardFileError", "MAX_FILE_BYTES", "read_guard_file"]

# FORMAT_VERSION (3): version 2 added the model fingerprint, the checksum and the calibration;
# version 3 the baselines and the fused detector. Version 1 files (no fingerprint, no checksum)
# are refused.
MAX_FILE_BYTES = 4 * 1024**3  # default size limit of a file; pass max_bytes= for larger detectors
MAX_HEADER_BYTES = 1024**2  # a real header is a few KiB
MAX_JSON_DEPTH = 8  # a real header nests 3 deep, its metadata values 2
MAX_INPUT_PIXELS = 2048 * 2048  # H * W of the fitted input (the model check runs one forward on it)
MAX_CHANNELS = 4096
_REQUIRED = frozenset({"format_version", "covguard_version", "detector", "hyperparameters", "model", "input_shape", "checksum"})
_OPTIONAL = frozenset({"covariance", "aggregation", "calibration"})
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class GuardFileError(ValueError):
    """A covguard detector or guard file that cannot be loaded; the message names the failed check."""


@dataclass(frozen=True, eq=False)
class GuardFile:
    """The verified content of a covguard file (checksum and schema checked, model not yet).

    Attributes
    ----------
    meta : dict of str -> str
        The raw string metadata.
    tensors : dict of str -> Tensor
        Named by the detector's kind (:mod:`covguard.guardcodec`).
    detector : str
        Registry name in :data:`covguard.DETECTORS`.
    params : dict
        Constructor keyword arguments (``hyperparameters``).
    channels : dict of str -> int
        Channel count of each tapped layer at fit time (empty for a detector of the logits).
    parameters_sha256 : str
        SHA-256 of the fitted model's state dict.
    input_shape : (int, int, int) or None
        (C, H, W) seen at fit time; None only for a detector that taps no layer and recorded none.
    calibration : dict or None
        The guard calibration (validated by :func:`covguard.load_guard`).
    """

    meta: dict[str, str]
    tensors: dict[str, Tensor]
    detector: str
    params: dict[str, Any]
    channels: dict[str, int]
    parameters_sha256: str
    input_shape: tuple[int, int, int] | None
    calibration: dict[str, Any] | None


def read_guard_file(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES) -> GuardFile:
    """Read and verify a covguard file: size, structure, checksum, schema (see the module docstring).

    Raises
    ------
    FileNotFoundError
        ``path`` is not a file.
    GuardFileError
        Any other failed check, with the reason.
    """
    path = Path(path)
    where = f"path {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist or is not a file")
    try:
        header, data = _read(path, where, max_bytes)
    except OSError as err:
        raise GuardFileError(f"{where} cannot be read: {err}") from err
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise GuardFileError(f"{where} is not a covguard detector file (no string metadata in its header)")
    version = _verify(where, meta, header, data)
    return _schema(where, meta, _tensors(header, data), version)


def json_depth(text: bytes) -> int:
    """Deepest nesting of ``[`` / ``{`` in JSON text, ignoring brackets inside strings."""
    stripped = np.frombuffer(_STRING.sub(b'""', text), dtype=np.uint8)
    delta = np.zeros(stripped.shape, dtype=np.int64)
    for char, step in ((b"[", 1), (b"{", 1), (b"]", -1), (b"}", -1)):
        delta[stripped == char[0]] = step
    return int(np.cumsum(delta).max(initial=0))


def loads(text: str | bytes, what: str) -> Any:
    """``json.loads`` with a depth limit and without NaN / Infinity; ValueError naming ``what``."""
    raw = text.encode() if isinstance(text, str) else text
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")

    def refuse(name: str) -> None:
        raise ValueError(f"{what} holds {name}, which is not a JSON number")

    try:
        return json.loads(raw, parse_constant=refuse)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{what} is not valid JSON ({err})") from err


def checksum(header: dict, data: bytes | bytearray | memoryview) -> str:
    """SHA-256 of the canonical header (without the checksum itself) and the tensor bytes."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "checksum"}
    digest = hashlib.sha256(dumps({**header, "__metadata__": meta}).encode())
    digest.update(data)
    return digest.hexdigest()


# ---- 1-2. size and structure -------------------------------------------------------------------


def _read(path: Path, where: str, max_bytes: int) -> tuple[dict, bytearray]:
    unreadable = f"{where} is not a readable safetensors file, or it is truncated or corrupted"
    with path.open("rb") as handle:
        size = path.stat().st_size
        if size > max_bytes:
            raise GuardFileError(f"{where} is {format_bytes(size)}, larger than the limit of {format_bytes(max_bytes)}")
        head = handle.read(8)
        if len(head) < 8:
            raise GuardFileError(f"{unreadable}: it is {len(head)} bytes long, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise GuardFileError(
                f"{unreadable}: its header claims {format_bytes(length)}; the file holds {format_bytes(size - 8)} "
                f"after the length field and headers are at most {format_bytes(MAX_HEADER_BYTES)}"
            )
        try:
            header = loads(handle.read(length), "its header")
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            end = _check_entries(header)
        except ValueError as err:
            raise GuardFileError(f"{unreadable}: {err}") from err
        if size != 8 + length + end:
            raise GuardFileError(
                f"{unreadable}: it is {format_bytes(size)} long but its header describes {format_bytes(8 + length + end)}"
            )
        data = bytearray(end)
        if handle.readinto(data) != end:
            raise GuardFileError(f"{unreadable}: it changed while it was read")
    return header, data


def _check_entries(header: dict) -> int:
    """Validate the tensor entries (dtype, shape, offsets contiguous from 0); returns the data length."""
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {key!r} is not a dtype / shape / data_offsets entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {key!r} has unknown dtype {dtype!r}")
        ints = shape if isinstance(shape, list) else [None]
        if len(ints) > 8 or not all(type(v) is int and 0 <= v < 2**40 for v in ints):
            raise ValueError(f"tensor {key!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int and v >= 0 for v in offsets)):
            raise ValueError(f"tensor {key!r} has invalid data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {key!r}: data_offsets {offsets} do not fit shape {shape} of {dtype}")
        spans.append((offsets[0], offsets[1], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise ValueError(f"tensor {key!r} starts at byte {begin} of the data, expected {position}")
        position = end
    return position


def _tensors(header: dict, data: bytearray) -> dict[str, Tensor]:
    out = {}
    for key, entry in header.items():
        dtype, (begin, end) = _DTYPES[entry["dtype"]], entry["data_offsets"]
        flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin) if end > begin else torch.empty(0, dtype=dtype)
        out[key] = flat.clone().reshape(entry["shape"])  # clone: own, aligned memory
    return out


# ---- 3. checksum and version -----------------------------------------------------------------------


def _verify(where: str, meta: dict[str, str], header: dict, data: bytearray) -> int:
    text = meta.get("format_version", "")
    version = int(text) if re.fullmatch(r"[0-9]{1,6}", text) else None
    stored = meta.get("checksum")
    if stored is None and version == 1:
        raise GuardFileError(
            f"{where} has format version 1, which has no checksum or model fingerprint and is no longer read; "
            "load it with the covguard that wrote it and save it again, or refit the detector"
        )
    if stored is None and version is None:
        raise GuardFileError(f"{where} is not a covguard detector file (no format_version or checksum in its metadata)")
    if not hmac.compare_digest(str(stored), checksum({**header, "__metadata__": meta}, data)):
        if version is not None and version > FORMAT_VERSION:
            raise GuardFileError(
                f"{where} has format version {version}, newer than this covguard reads ({FORMAT_VERSION}): "
                "upgrade covguard (or the file is corrupted: its checksum does not match)"
            )
        raise GuardFileError(f"{where} is corrupted: its checksum does not match its content")
    if version is None or version < 2:
        raise GuardFileError(f"{where} has a malformed format_version {text!r}")
    if version > FORMAT_VERSION:
        raise GuardFileError(f"{where} has format version {version}, newer than this covguard reads ({FORMAT_VERSION}); upgrade covguard")
    return version


# ---- 4. schema -------------------------------------------------------------------------------------


def _schema(where: str, meta: dict[str, str], tensors: dict[str, Tensor], version: int) -> GuardFile:
    try:
        missing, unknown = sorted(_REQUIRED - set(meta)), sorted(set(meta) - _REQUIRED - _OPTIONAL)
        if missing or unknown:
            raise ValueError(f"metadata keys missing {missing}, unknown {unknown}")
        name = meta["detector"]
        if name not in DETECTORS:
            raise ValueError(f"detector {name!r} is not one of {sorted(DETECTORS)}")
        if version < format_version(name):
            raise ValueError(f"detector {name!r} is written in format version {format_version(name)}, not {version}")
        params = loads(meta["hyperparameters"], "hyperparameters")
        fingerprint = loads(meta["model"], "model")
        input_shape = loads(meta["input_shape"], "input_shape")
        calibration = loads(meta["calibration"], "calibration") if "calibration" in meta else None
        if not isinstance(params, dict) or not isinstance(fingerprint, dict):
            raise ValueError("hyperparameters and model must be JSON objects")
        if calibration is not None and not isinstance(calibration, dict):
            raise ValueError("calibration must be a JSON object")
        layers, channels, sha = _fingerprint(fingerprint)
        shape = _input_shape(input_shape, layers)
        for key, value in (("covariance", params.get("covariance", "")), ("aggregation", params.get("aggregate", ""))):
            if key in meta and meta[key] != str(value):
                raise ValueError(f"metadata {key}={meta[key]!r} disagrees with the hyperparameters ({value!r})")
        tapped = check_content(name, params, tensors, channels)
        if tapped != layers:
            raise ValueError(f"model fingerprint layers {layers} are not those the detector taps, {tapped}")
    except ValueError as err:
        raise GuardFileError(f"{where} has invalid content: {err}") from err
    return GuardFile(meta, tensors, name, params, channels, sha, shape, calibration)


def _fingerprint(fingerprint: dict) -> tuple[list[str], dict[str, int], str]:
    """Layers (distinct module names, possibly none), their channel counts, and the parameters' SHA-256."""
    if set(fingerprint) != {"layers", "channels", "parameters_sha256"}:
        raise ValueError("model fingerprint must hold layers (those of the hyperparameters), channels and parameters_sha256")
    layers, channels, sha = fingerprint["layers"], fingerprint["channels"], fingerprint["parameters_sha256"]
    if not isinstance(layers, list) or not all(isinstance(v, str) and v for v in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"model layers must be a list of distinct module names; got {layers!r}")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError(f"model parameters_sha256 must be 64 hex digits; got {sha!r}")
    if not isinstance(channels, dict) or set(channels) != set(layers):
        raise ValueError(f"model channels must give a count for each layer {layers}; got {channels!r}")
    for layer, c in channels.items():
        positive_int(c, f"channels of layer {layer!r}", MAX_CHANNELS)
    return layers, channels, sha


def _input_shape(value: Any, layers: list[str]) -> tuple[int, int, int] | None:
    """(C, H, W) of positive integers within the limits; null only for a detector that taps no layer."""
    if value is None and not layers:
        return None
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"input_shape must be [C, H, W]; got {value!r}")
    c, h, w = (positive_int(v, f"input_shape {value}", MAX_INPUT_PIXELS) for v in value)
    if c > MAX_CHANNELS or h * w > MAX_INPUT_PIXELS:
        raise ValueError(f"input_shape {value} exceeds {MAX_CHANNELS} channels or {MAX_INPUT_PIXELS} pixels")
    return c, h, w
