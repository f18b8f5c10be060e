"""How each kind of detector lays out its state in a covguard file, and how it is rebuilt.

The kind follows from the class that the file's ``detector`` names in :data:`covguard.DETECTORS`:

- **patch** (``simple_mahalanobis``, ``class_mahalanobis``; format 2): tensors
  ``forms/<layer>/mean|proj|gain|diag`` and ``standardize/mean|std``, float64; hyperparameters
  the constructor's less ``keep_moments``.
- **baseline** (the names of :data:`~covguard.detectors.baselines.BASELINES`; format 3): the
  tensors of ``state_tensors()`` under their own names, checked against the class's
  ``state_spec`` (:mod:`covguard.detectors.state`); none for MSP, Energy, MaxLogit, GEN and ODIN,
  whose files hold their hyperparameters only.
- **fused** (``fused``; format 3): each member's tensors under ``members/<name>/`` and its
  calibration scores as ``calibration/<name>`` (sorted ascending, float64, n >= 2); the
  hyperparameters ``{"members": [{"name", "detector", "hyperparameters"}, ...], "rule",
  "tail_size"}`` list the members in order. Member names hold no ``/``; a member cannot be
  fused itself.

:func:`encode` turns a fitted detector into tensors and hyperparameters; :func:`check_content`
is the schema of the tensors (no model needed, a ``ValueError`` naming the tensor, and the
member); :func:`build` rebuilds the detector on a model; :func:`model_mismatch` says what in a
model's class count contradicts the rebuilt state.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from covguard import pvalues
from covguard.covariance import QuadraticForm
from covguard.detectors import DETECTORS, ClassMahalanobis, Detector, FusedDetector, PatchMahalanobis, check_is_fitted
from covguard.detectors.state import TensorStateDetector

__all__ = ["FIELDS", "FORMAT_VERSION", "Encoded", "build", "check_content", "dumps", "encode", "format_version", "model_mismatch", "module_names"]

#: Newest format read and written: 3 added the baselines and the fused detector. Patch detector
#: files are still written as format 2 (their layout did not change), so older covguards read them.
FORMAT_VERSION = 3
FIELDS = ("mean", "proj", "gain", "diag")
_MEMBER_KEYS = ("name", "detector", "hyperparameters")
_MAX_NAME = 100


@dataclass(frozen=True)
class Encoded:
    """A fitted detector as file content: registry ``name``, JSON ``params``, ``tensors``, the
    ``channels`` of each tapped layer, and the model hash the detector recorded (or None)."""

    name: str
    params: dict[str, Any]
    tensors: dict[str, Tensor]
    channels: dict[str, int]
    model_sha256: str | None


def format_version(name: str) -> int:
    """The format version a file of detector ``name`` is written in (the oldest that holds it)."""
    return 2 if issubclass(DETECTORS[name], PatchMahalanobis) else FORMAT_VERSION


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def positive_int(value: Any, what: str, high: int) -> int:
    """``value`` if it is an int in [1, high]; ValueError naming ``what`` otherwise."""
    if type(value) is not int or not 1 <= value <= high:
        raise ValueError(f"{what} must be an integer in [1, {high}]; got {value!r}")
    return value


# ---- writing -------------------------------------------------------------------------------------


def encode(detector: Detector) -> Encoded:
    """Tensors (CPU, contiguous), hyperparameters and channels of a fitted registered detector.

    Raises
    ------
    TypeError
        ``detector`` (or a member) is not of a class in :data:`covguard.DETECTORS`, or a fused
        detector is a member.
    ValueError
        A member name holds ``/``; an unfitted detector (:class:`~covguard.NotFittedError`).
    """
    name = next((key for key, cls in DETECTORS.items() if type(detector) is cls), None)
    if name is None:
        raise TypeError(f"detector must be one of {sorted(DETECTORS)} to be saved; got {type(detector).__name__}")
    check_is_fitted(detector)
    if isinstance(detector, PatchMahalanobis):
        tensors = {f"standardize/{key}": t for key, t in detector.fusion_state().items()}  # mean, std (, correlation)
        for prefix, forms in (("forms", detector.forms_), ("background", detector.background_forms_)):
            for layer, form in forms.items():
                tensors.update({f"{prefix}/{layer}/{f}": getattr(form, f) for f in FIELDS if getattr(form, f) is not None})
        tensors = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
        return Encoded(name, patch_params(detector), tensors, dict(detector.channels_), detector.model_sha256_)
    if isinstance(detector, TensorStateDetector):
        channels = {layer: detector.channels_ for layer in detector.layers}
        return Encoded(name, detector.get_params(), detector.state_tensors(), channels, None)
    members, tensors, channels, sha = [], {}, {}, None
    for member, det in detector.members.items():
        if "/" in member or len(member) > _MAX_NAME:
            raise ValueError(f"member names must hold no '/' and at most {_MAX_NAME} characters to be saved; got {member!r}")
        if isinstance(det, FusedDetector):
            raise TypeError(f"member {member!r} is a FusedDetector: a saved fused detector cannot nest another")
        part = encode(det)
        members.append({"name": member, "detector": part.name, "hyperparameters": part.params})
        tensors.update({f"members/{member}/{key}": t for key, t in part.tensors.items()})
        tensors[f"calibration/{member}"] = detector.calibration_[member].contiguous()
        channels.update(part.channels)
        sha = sha or part.model_sha256
    params = {"members": members, "rule": detector.rule, "tail_size": detector.tail_size}
    return Encoded(name, params, tensors, channels, sha)


#: Patch options added after format 2, with the value a file that omits one means: written only
#: when they differ from it, so a detector at these values writes the bytes format 2 wrote (and
#: older readers still read it). Fixed for good: a later change of a constructor default does not
#: change what an existing file means.
_LATER_OPTIONS = {"top_fraction": 0.1, "normalize": "none", "fusion": "sum", "relative": False, "fit_positions": 1.0, "random_state": 0}


def patch_params(detector: PatchMahalanobis) -> dict[str, Any]:
    """The hyperparameters a file records: the constructor's, less ``keep_moments`` (moments are
    not saved) and the later options at the values an omitted one means."""
    return {
        key: value for key, value in detector.get_params().items()
        if key != "keep_moments" and not (key in _LATER_OPTIONS and value == _LATER_OPTIONS[key])
    }


def _with_later_options(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` of a patch-detector file with the later options it omits at their file values."""
    accepted = inspect.signature(cls.__init__).parameters
    return {**{key: value for key, value in _LATER_OPTIONS.items() if key in accepted}, **params}


# ---- schema (no model) ---------------------------------------------------------------------------


def check_content(name: str, params: dict[str, Any], tensors: Mapping[str, Tensor], channels: Mapping[str, int]) -> list[str]:
    """Check the hyperparameters and tensors of detector ``name`` against the fingerprint's channels.

    Parameters
    ----------
    name : str
        A key of :data:`covguard.DETECTORS`.
    params : dict
        The file's hyperparameters (parsed JSON).
    tensors : mapping of str to Tensor
        The file's tensors (for a member: its own, prefix removed).
    channels : mapping of str to int
        Channel count of each layer in the model fingerprint.

    Returns
    -------
    list of str
        The layers the detector taps, in order (those of the fingerprint, for a whole file).

    Raises
    ------
    ValueError
        Naming the tensor or key (and the member) that breaks the schema.
    """
    cls = DETECTORS[name]
    if issubclass(cls, PatchMahalanobis):
        return _check_patch(params, tensors, channels)
    if issubclass(cls, TensorStateDetector):
        layer = params.get("feature_layer")
        if layer is not None and (not isinstance(layer, str) or layer not in channels):
            raise ValueError(f"hyperparameters feature_layer {layer!r} must be a layer of the model fingerprint {sorted(channels)}")
        cls.check_state(tensors, channels=None if layer is None else channels[layer])
        return [] if layer is None else [layer]
    return _check_fused(params, tensors, channels)


def _check_patch(params: dict[str, Any], tensors: Mapping[str, Tensor], channels: Mapping[str, int]) -> list[str]:
    layers = params.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(v, str) and v for v in layers):
        raise ValueError(f"hyperparameters layers must be a non-empty list of module names; got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"hyperparameters layers must be distinct; got {layers}")
    if not set(layers) <= set(channels):
        raise ValueError(f"model channels must give a count for each layer {layers}; got {dict(channels)!r}")
    kernel = params.get("kernel_size", 3)
    kernel = kernel if isinstance(kernel, dict) else dict.fromkeys(layers, kernel)
    if set(kernel) != set(layers):
        raise ValueError(f"hyperparameters kernel_size must give a size for each layer {layers}; got {kernel!r}")
    for layer, k in kernel.items():
        positive_int(k, f"kernel_size of layer {layer!r}", 64)
    _check_patch_tensors(
        tensors, layers, {layer: channels[layer] * kernel[layer] ** 2 for layer in layers},
        gaussian=params.get("fusion") == "gaussian", relative=params.get("relative") is True,
    )
    return layers


def _check_patch_tensors(
    tensors: Mapping[str, Tensor], layers: list[str], dims: dict[str, int], *, gaussian: bool, relative: bool
) -> None:
    """Names, dtype, shapes (K groups, D = C k^2 per layer, r projections), finiteness, signs; the
    layer-score correlation of a Gaussian fusion and the background forms of relative distances."""
    expected = {"standardize/mean", "standardize/std"} | {f"forms/{layer}/{f}" for layer in layers for f in FIELDS}
    if gaussian:
        expected.add("standardize/correlation")
    if relative:
        expected |= {f"background/{layer}/{f}" for layer in layers for f in FIELDS}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ValueError(f"unexpected tensors {unknown[:5]}")
    for key, t in tensors.items():
        if t.dtype != torch.float64:
            raise ValueError(f"tensor {key!r} must be float64; got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"tensor {key!r} holds NaN or inf")
    for key in ("standardize/mean", "standardize/std"):
        if key not in tensors:
            raise ValueError(f"tensor {key!r} is missing")
        if tuple(tensors[key].shape) != (len(layers),):
            raise ValueError(f"tensor {key!r} must have shape ({len(layers)},); got {tuple(tensors[key].shape)}")
    if not (tensors["standardize/std"] > 0).all():
        raise ValueError("tensor 'standardize/std' must be positive")
    if gaussian:
        corr = tensors.get("standardize/correlation")
        if corr is None or tuple(corr.shape) != (len(layers),) * 2:
            raise ValueError(f"tensor 'standardize/correlation' must have shape ({len(layers)}, {len(layers)}) with fusion='gaussian'")
        if not torch.equal(corr, corr.T) or not (corr.diagonal() > 0).all():
            raise ValueError("tensor 'standardize/correlation' must be symmetric with a positive diagonal")
    _check_forms(tensors, "forms", layers, dims)
    if relative:
        _check_forms(tensors, "background", layers, dims, groups=1)


def _check_forms(
    tensors: Mapping[str, Tensor], prefix: str, layers: list[str], dims: dict[str, int], groups: int | None = None
) -> None:
    """Each layer's form under ``prefix``: present, shapes agreeing (K groups), positive definite."""
    for layer in layers:
        mean, proj, gain, diag = (tensors.get(f"{prefix}/{layer}/{f}") for f in FIELDS)
        if mean is None or (proj is None) != (gain is None) or (proj is None and diag is None):
            raise ValueError(f"the {prefix} tensors of layer {layer!r} are missing (mean, and proj with gain or diag)")
        D = dims[layer]
        K = mean.shape[0] if mean.ndim == 2 else 0
        groups = K if groups is None else groups
        shapes = {"mean": (mean, (groups, D)), "diag": (diag, (groups, D))}
        if proj is not None:
            r = proj.shape[-1] if proj.ndim == 3 and 1 <= proj.shape[-1] <= D else -1
            shapes.update(proj=(proj, (groups, D, r)), gain=(gain, (groups, r)))
        for field, (t, shape) in shapes.items():
            if t is not None and (tuple(t.shape) != shape or groups < 1):
                raise ValueError(f"tensor '{prefix}/{layer}/{field}' has shape {tuple(t.shape)}; expected {shape} (D = C k^2)")
        if diag is not None and not (diag > 0).all():
            raise ValueError(f"tensor '{prefix}/{layer}/diag' must be positive")
        if gain is not None and diag is None and not (gain > 0).all():
            raise ValueError(f"tensor '{prefix}/{layer}/gain' must be positive without a diag")
        if gain is not None and diag is not None and not (gain + diag.amax(-1, keepdim=True) >= 0).all():
            raise ValueError(f"tensor '{prefix}/{layer}/gain' is below -diag: the precision is not positive definite")


def _check_fused(params: dict[str, Any], tensors: Mapping[str, Tensor], channels: Mapping[str, int]) -> list[str]:
    if sorted(params) != ["members", "rule", "tail_size"]:
        raise ValueError(f"hyperparameters of a fused detector must hold exactly members, rule, tail_size; got {sorted(params)}")
    if not isinstance(params["rule"], str) or params["rule"] not in pvalues.RULES:
        raise ValueError(f"hyperparameters rule must be one of {sorted(pvalues.RULES)}; got {params['rule']!r}")
    positive_int(params["tail_size"], "hyperparameters tail_size", 2**31)
    members = params["members"]
    if not isinstance(members, list) or not members:
        raise ValueError(f"hyperparameters members must be a non-empty list; got {members!r}")
    names: list[str] = []
    for entry in members:
        if not isinstance(entry, dict) or sorted(entry) != sorted(_MEMBER_KEYS):
            raise ValueError(f"each member must hold exactly {list(_MEMBER_KEYS)}; got {entry!r}"[:300])
        member, kind, hyper = (entry[key] for key in _MEMBER_KEYS)
        if not isinstance(member, str) or not member or "/" in member or len(member) > _MAX_NAME or member in names:
            raise ValueError(f"member names must be distinct non-empty strings without '/', at most {_MAX_NAME} long; got {member!r}")
        names.append(member)
        if not isinstance(kind, str) or kind not in DETECTORS or kind == "fused" or not isinstance(hyper, dict):
            raise ValueError(f"member {member!r} must name a detector of {sorted(set(DETECTORS) - {'fused'})} with a hyperparameters object; got {kind!r}"[:300])
    layers: dict[str, None] = {}
    claimed: set[str] = set()
    for member, kind, hyper in ((entry[key] for key in _MEMBER_KEYS) for entry in members):
        prefix = f"members/{member}/"
        own = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
        try:
            layers.update(dict.fromkeys(check_content(kind, hyper, own, channels)))
        except ValueError as err:
            raise ValueError(f"member {member!r} ({kind}): {err}") from err
        _check_calibration(tensors.get(f"calibration/{member}"), member)
        claimed |= {prefix + key for key in own} | {f"calibration/{member}"}
    unexpected = sorted(set(tensors) - claimed)
    if unexpected:
        raise ValueError(f"unexpected tensors {unexpected[:5]}, outside members/<member>/ and calibration/<member>")
    return list(layers)


def _check_calibration(scores: Tensor | None, member: str) -> None:
    key = f"calibration/{member}"
    if scores is None:
        raise ValueError(f"tensor {key!r} is missing: each member needs its calibration scores")
    if scores.dtype != torch.float64 or scores.ndim != 1 or scores.numel() < 2:
        raise ValueError(f"tensor {key!r} must be 1-D float64 with n >= 2 scores; got {scores.dtype} of shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"tensor {key!r} holds NaN or inf")
    if (scores[1:] < scores[:-1]).any():
        raise ValueError(f"tensor {key!r} must be sorted ascending")


# ---- rebuilding on a model -----------------------------------------------------------------------


def module_names(name: str, params: dict[str, Any]) -> dict[str, str]:
    """The modules of the model a (schema-checked) detector reads: module name -> role
    (``"tapped layer"`` or ``"fc_layer"``)."""
    if name == "fused":
        return {key: role for m in params["members"] for key, role in module_names(m["detector"], m["hyperparameters"]).items()}
    out = dict.fromkeys(params["layers"] if issubclass(DETECTORS[name], PatchMahalanobis) else [], "tapped layer")
    if isinstance(params.get("feature_layer"), str):
        out[params["feature_layer"]] = "tapped layer"
    if isinstance(params.get("fc_layer"), str):
        out.setdefault(params["fc_layer"], "fc_layer")
    return out


def build(
    name: str,
    params: dict[str, Any],
    tensors: Mapping[str, Tensor],
    model: nn.Module,
    *,
    channels: Mapping[str, int],
    input_shape: tuple[int, int, int] | None,
    model_sha256: str | None,
) -> Detector:
    """Rebuild a detector from schema-checked content on ``model`` (whose modules exist).

    Raises
    ------
    ValueError
        Hyperparameters that the class refuses or does not reproduce, naming the member; the
        message reads after "has" (``hyperparameters that KNN refuses: ...``).
    """
    cls = DETECTORS[name]
    if cls is FusedDetector:
        members = {}
        for m in params["members"]:
            prefix = f"members/{m['name']}/"
            own = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
            try:  # members leave the model hash to the fused file (a non-strict load accepts other weights)
                members[m["name"]] = build(m["detector"], m["hyperparameters"], own, model, channels=channels,
                                           input_shape=input_shape, model_sha256=None)  # fmt: skip
            except ValueError as err:
                raise ValueError(f"member {m['name']!r} with {err}") from err
        try:
            fused = FusedDetector(members, rule=params["rule"], tail_size=params["tail_size"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"members that FusedDetector refuses: {err}") from err
        return fused.set_calibration({m: tensors[f"calibration/{m}"] for m in members}, input_shape=input_shape)
    try:
        detector = cls(model, **(_with_later_options(cls, params) if issubclass(cls, PatchMahalanobis) else params))
        rebuilt = patch_params(detector) if isinstance(detector, PatchMahalanobis) else detector.get_params()
    except (TypeError, ValueError) as err:
        raise ValueError(f"hyperparameters that {cls.__name__} refuses: {err}") from err
    if dumps(params) != dumps({key: rebuilt.get(key) for key in params}):
        raise ValueError(f"hyperparameters that {cls.__name__} does not reproduce: saved {dumps(params)}, rebuilt {dumps(rebuilt)}")
    if isinstance(detector, PatchMahalanobis):
        forms, background = (
            {layer: QuadraticForm(**{f: tensors.get(f"{prefix}/{layer}/{f}") for f in FIELDS}) for layer in detector.layers}
            for prefix in ("forms", "background")
        )
        detector.set_state(
            forms, {layer: channels[layer] for layer in detector.layers}, score_mean=tensors["standardize/mean"],
            score_std=tensors["standardize/std"], input_shape=input_shape, model_sha256=model_sha256,
            score_correlation=tensors.get("standardize/correlation"),
            background_forms=background if detector.get_params().get("relative") else None,
        )  # fmt: skip
        return detector
    return detector.set_state_tensors(tensors, input_shape=input_shape)


def model_mismatch(detector: Detector, classes: int) -> str | None:
    """What contradicts the rebuilt state in a model with ``classes`` outputs, or None."""
    if isinstance(detector, FusedDetector):
        for member, det in detector.members.items():
            reason = model_mismatch(det, classes)
            if reason:
                return f"member {member!r}: {reason}"
        return None
    if isinstance(detector, PatchMahalanobis):
        groups = next(iter(detector.forms_.values())).mean.shape[0]
        per_class = isinstance(detector, ClassMahalanobis)
        if groups != (classes if per_class else 1):
            return f"it has {classes} classes, the detector {groups} {'classes' if per_class else 'groups (1 expected)'}"
        return None
    try:
        detector.check_model(classes)
    except ValueError as err:
        return str(err)
    return None
