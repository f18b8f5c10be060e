"""Save and load fitted patch detectors as safetensors + JSON metadata (never pickle).

The file holds the scoring tensors (``forms/<layer>/mean|proj|gain|diag``, float64) and the
layer standardization (``standardize/mean|std``). Its string metadata holds the format version,
the covguard version, the detector name and hyperparameters, the tapped layers with their
channel counts, and the input shape seen at fit time. :func:`load` rebuilds the detector on a
given model and refuses a model whose tapped layers have other channel counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from covguard.covariance import QuadraticForm
from covguard.detectors import DETECTORS
from covguard.detectors.base import check_is_fitted, eval_mode
from covguard.detectors.patch import PatchMahalanobis
from covguard.features import FeatureTap, model_device

__all__ = ["save", "load", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_FIELDS = ("mean", "proj", "gain", "diag")


def save(detector: PatchMahalanobis, path: str | Path) -> Path:
    """Write a fitted detector to ``path`` (safetensors). Returns the path."""
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
                tensors[f"forms/{layer}/{field}"] = value.contiguous()
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "covguard_version": __version__,
        "detector": name,
        "hyperparameters": json.dumps(detector.hyperparameters(), sort_keys=True),
        "channels": json.dumps(detector.channels_, sort_keys=True),
        "input_shape": json.dumps(list(detector.input_shape_)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load(path: str | Path, model: nn.Module) -> PatchMahalanobis:
    """Load a detector saved by :func:`save` and attach it to ``model``.

    Parameters
    ----------
    path : str or Path
    model : nn.Module
        The classifier the detector was fitted on (same tapped layers and channel counts).

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file; unreadable or truncated file; newer format; unknown detector; missing
        tensors; a model whose tapped layers differ from those at fit time.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"path {str(path)!r} is not a readable safetensors file ({err})") from err
    version = int(meta.get("format_version", "0"))
    if version != FORMAT_VERSION:
        raise ValueError(f"path {str(path)!r} has format version {version}; this covguard reads version {FORMAT_VERSION}")
    if meta.get("detector") not in DETECTORS:
        raise ValueError(f"path {str(path)!r} holds detector {meta.get('detector')!r}; known: {sorted(DETECTORS)}")
    params = json.loads(meta["hyperparameters"])
    channels = {layer: int(c) for layer, c in json.loads(meta["channels"]).items()}
    input_shape = tuple(json.loads(meta["input_shape"]))
    detector = DETECTORS[meta["detector"]](model, **params)
    _check_model(model, detector.layers, channels, input_shape)
    forms = {}
    for layer in detector.layers:
        found = {field: tensors.get(f"forms/{layer}/{field}") for field in _FIELDS}
        if found["mean"] is None or (found["proj"] is None and found["diag"] is None):
            raise ValueError(f"path {str(path)!r} is missing the tensors of layer {layer!r}")
        forms[layer] = QuadraticForm(**found)
    for key in ("standardize/mean", "standardize/std"):
        if key not in tensors:
            raise ValueError(f"path {str(path)!r} is missing tensor {key!r}")
    detector.forms_ = forms
    detector.channels_ = channels
    detector.score_mean_, detector.score_std_ = tensors["standardize/mean"], tensors["standardize/std"]
    detector.input_shape_ = input_shape
    return detector


def _check_model(model: nn.Module, layers: tuple[str, ...], channels: dict[str, int], input_shape: tuple) -> None:
    """Run one forward on zeros and compare the tapped layers' channel counts with the fitted ones."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros(1, *input_shape, dtype=dtype, device=model_device(model))
    try:
        with eval_mode(model), torch.no_grad(), FeatureTap(model, layers) as tap:
            _, feats = tap(x)
    except RuntimeError as err:
        raise ValueError(f"model cannot run the fitted input shape {input_shape}: {err}") from err
    wrong = {layer: (channels[layer], f.shape[1]) for layer, f in feats.items() if f.shape[1] != channels[layer]}
    if wrong:
        detail = ", ".join(f"{layer!r}: fitted C={a}, model C={b}" for layer, (a, b) in wrong.items())
        raise ValueError(f"model does not match the saved detector ({detail})")
