"""Export a classifier and its calibrated guard as one graph: ONNX (or TorchScript).

:class:`GuardedModel` rebuilds the scoring of a fitted :class:`~covguard.SimpleMahalanobis` or
:class:`~covguard.ClassMahalanobis` from its public state (``forms_``, ``score_mean_``,
``score_std_``, ``kernel_size``, ``padding``, ``aggregate``, ``scoring``, ``top_m``) as plain
tensor operations with no data-dependent Python control flow, so that tracing records all of it:

``images (N, C, H, W) in [0, 1] -> logits (N, K), score (N,), flagged (N,)``.

Per tapped layer with map ``F`` (N, C, H, W), shifted by a per-channel offset (the mean of the
group means; distances do not change, float32 keeps its digits), and each of the ``G`` groups
(``G = 1`` for Simple, the ``K`` classes for Class) of the layer's
:class:`~covguard.covariance.QuadraticForm` ``(mean, proj, gain, diag)``:

- projection part: one ``k x k`` convolution with ``G r`` output channels, weights
  ``sqrt|gain_r| proj_r`` and bias ``-sqrt|gain_r| proj_r^T mean``, then ``sum_r sign(gain_r) z_r^2``;
- diagonal part: one ``k x k`` convolution of ``[F^2, F]`` with ``G`` output channels, weights
  ``[diag, -2 diag mean]`` and bias ``sum diag mean^2``.

That is the maths of :func:`covguard.patches.patch_mahalanobis_sq`, written densely (no
triangular chunks, no segment loops). A Class detector scores every image against all ``G``
class maps and keeps the predicted class's (``top1``: a one-hot weight of ``argmax(logits)``)
or the renormalized top-``m`` probabilities (``mixture``): ``G`` times the convolutions of the
library's top-1 path, in exchange for a graph without gathers of per-image kernels. Maps are
aggregated (mean in float64, or max), rounded to the model's dtype, z-scored and summed in
float64 as the detector does; ``flagged = not (score <= threshold)`` in float64 (NaN is flagged).

Export path: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based tracer. It needs
only ``torch`` (plus ``onnx`` to check the file and write metadata), works offline, and traces
the forward hooks that capture the feature maps. torch 2.13's default ``dynamo=True`` exporter
needs the ``onnxscript`` package besides, and gains nothing on a graph without control flow.
"""

from __future__ import annotations

import json
import inspect
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covguard.detectors import ClassMahalanobis, SimpleMahalanobis
from covguard.detectors.base import check_is_fitted
from covguard.detectors.layer_fusion import GAUSSIAN_RIDGE
from covguard.features import FeatureTap, eval_mode, model_device, model_dtype

__all__ = ["DEFAULT_OPSET", "EXPORT_FORMATS", "GuardedModel", "export_guard", "verify_onnx"]

#: ``format=`` name -> file suffix.
EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULT_OPSET = 17
_INPUT, _OUTPUTS = "images", ("logits", "score", "flagged")
# Hyperparameters whose meaning GuardedModel implements; a detector with another one at a value
# other than its default is refused rather than exported with a silently different score.
_KNOWN_HYPERPARAMETERS = frozenset({
    "layers", "covariance", "rank", "shrinkage", "eps", "kernel_size", "padding", "aggregate", "keep_moments",
    "fit_positions", "random_state",  # fit-time options: the fitted forms carry them
    "fusion",
    "class_weights", "scoring", "top_m", "basis_rank",
})


class _LayerDistance(nn.Module):
    """Squared distances of every patch of one layer to each of the ``G`` groups of a form.

    Parameters
    ----------
    form : QuadraticForm
        ``mean`` (G, D), ``proj`` (G, D, r) / ``gain`` (G, r) or None, ``diag`` (G, D) or None,
        ``D = C k^2``.
    kernel_size, padding : int
    dtype : torch.dtype
        Dtype of the convolutions (the model's).
    """

    def __init__(self, form, *, kernel_size: int, padding: int, dtype: torch.dtype) -> None:
        super().__init__()
        mean = form.mean.double().cpu()  # (G, D)
        G, D = mean.shape
        kk = kernel_size * kernel_size
        C = D // kk
        self.groups, self.kernel_size, self.padding = G, kernel_size, padding
        offset = mean.reshape(G, C, kk).mean(dim=(0, 2))  # (C,)
        mean = mean - offset.repeat_interleave(kk)[None]  # (G, D): mean of the shifted map
        self.register_buffer("offset", offset.reshape(1, C, 1, 1).to(dtype))
        self.rank = 0
        if form.proj is not None:
            proj, gain = form.proj.double().cpu(), form.gain.double().cpu()  # (G, D, r), (G, r)
            self.rank = proj.shape[-1]
            rows = (proj * gain.abs().sqrt()[:, None, :]).transpose(1, 2)  # (G, r, D) scaled directions
            bias = -(rows @ mean[:, :, None])[..., 0]  # (G, r)
            self.register_buffer("proj_weight", rows.reshape(G * self.rank, C, kernel_size, kernel_size).to(dtype))
            self.register_buffer("proj_bias", bias.reshape(-1).to(dtype))  # (G r,)
            self.register_buffer("proj_sign", torch.sign(gain).reshape(1, G, self.rank, 1, 1).to(dtype))
        self.has_diag = form.diag is not None
        if self.has_diag:
            diag = form.diag.double().cpu()  # (G, D)
            weight = torch.cat([diag, -2 * diag * mean], dim=1)  # (G, 2D): weights of [F^2, F]
            self.register_buffer(
                "diag_weight",
                weight.reshape(G, 2, C, kk).reshape(G, 2 * C, kernel_size, kernel_size).to(dtype),
            )
            self.register_buffer("diag_bias", (diag * mean * mean).sum(1).to(dtype))  # (G,)

    def forward(self, f: Tensor) -> Tensor:
        """Feature map (N, C, H, W) -> squared distances (N, G, H', W')."""
        if self.padding:
            f = F.pad(f, (self.padding,) * 4)  # true zeros, before the shift
        x = f - self.offset  # (N, C, H, W)
        out = None
        if self.rank:
            z = F.conv2d(x, self.proj_weight, self.proj_bias)  # (N, G r, H', W')
            N, _, H2, W2 = z.shape
            out = (z * z).reshape(N, self.groups, self.rank, H2, W2).mul(self.proj_sign).sum(2)  # (N, G, H', W')
        if self.has_diag:
            d = F.conv2d(torch.cat([x * x, x], dim=1), self.diag_weight, self.diag_bias)  # (N, G, H', W')
            out = d if out is None else out + d
        return out.clamp_min(0.0)


class GuardedModel(nn.Module):
    """A classifier and its patch-Mahalanobis guard as one module: ``images -> (logits, score, flagged)``.

    Parameters
    ----------
    detector : SimpleMahalanobis or ClassMahalanobis
        Fitted (on ``detector.model``, which this module holds and runs).
    threshold : float
        Images scoring above it (or NaN) are flagged, as :class:`covguard.Guard` does.

    Shape
    -----
    - Input: ``(N, C, H, W)`` images in ``[0, 1]`` in the model's dtype.
    - Output: logits ``(N, K)``; score ``(N,)`` in the model's dtype, larger = more anomalous;
      flagged ``(N,)`` bool.

    Examples
    --------
    >>> guarded = GuardedModel(guard.detector, threshold=guard.threshold_).eval()   # doctest: +SKIP
    >>> logits, score, flagged = guarded(x)                                          # doctest: +SKIP
    """

    def __init__(self, detector: SimpleMahalanobis | ClassMahalanobis, *, threshold: float) -> None:
        super().__init__()
        if not isinstance(detector, (SimpleMahalanobis, ClassMahalanobis)):
            raise TypeError(f"detector must be a SimpleMahalanobis or ClassMahalanobis; got {type(detector).__name__}")
        check_is_fitted(detector)
        signature = inspect.signature(type(detector).__init__).parameters
        unknown = sorted(
            f"{key}={value!r}" for key, value in detector.get_params().items()
            if key not in _KNOWN_HYPERPARAMETERS and value != signature[key].default
        )
        if unknown:
            raise ValueError(f"cannot export a detector with {', '.join(unknown)}: the exported graph does not implement it")
        if detector.aggregate not in ("mean", "max"):
            raise ValueError(f"cannot export aggregate={detector.aggregate!r}; mean and max are exported")
        self.class_conditional = isinstance(detector, ClassMahalanobis)
        if self.class_conditional and detector.scoring not in ("top1", "mixture"):
            raise ValueError(f"cannot export scoring={detector.scoring!r}; top1 and mixture are exported")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number; got {threshold}")
        self.model = detector.model
        self.layers = tuple(detector.layers)
        self.aggregate = detector.aggregate
        self.scoring = getattr(detector, "scoring", "top1")
        self.top_m = int(getattr(detector, "top_m", 1))
        dtype = model_dtype(self.model)
        _warn_if_out_of_range(detector, dtype)
        self.distances = nn.ModuleList(
            _LayerDistance(
                detector.forms_[layer], kernel_size=detector.gaussians[layer].kernel_size,
                padding=detector.gaussians[layer].padding, dtype=dtype
            )
            for layer in self.layers
        )
        device = model_device(self.model)
        self.distances.to(device)
        self.register_buffer("score_mean", detector.score_mean_.double().to(device))  # (n_layers,)
        self.register_buffer("score_std", detector.score_std_.double().to(device))  # (n_layers,)
        self.fusion = detector.fusion
        if self.fusion == "gaussian":  # W with W^T W = (R + ridge I)^-1: the inverse Cholesky factor
            corr = detector.fusion_state()["correlation"]
            ridged = corr + GAUSSIAN_RIDGE * torch.eye(len(corr), dtype=torch.float64)
            self.register_buffer("whitening", torch.linalg.inv(torch.linalg.cholesky(ridged)).to(device))  # (L, L)
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64, device=device))
        self.input_shape = tuple(detector.input_shape_)
        self.training = False  # an inference wrapper; the classifier's own mode is left as it is

    def _group_weights(self, logits: Tensor, groups: int) -> Tensor:
        """(N, G) weight of each class map: one-hot predicted class, or renormalized top-m probabilities."""
        if self.scoring == "top1":
            classes = torch.arange(groups, device=logits.device)
            return (classes[None, :] == logits.argmax(1, keepdim=True)).to(logits.dtype)  # (N, G)
        probs = logits.softmax(1)  # (N, G)
        top_p, top_k = probs.topk(min(self.top_m, groups), dim=1)  # (N, m)
        return torch.zeros_like(probs).scatter(1, top_k, top_p / top_p.sum(1, keepdim=True))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``images`` (N, C, H, W) in [0, 1] -> logits (N, K), score (N,), flagged (N,) bool."""
        with FeatureTap(self.model, self.layers) as tap:
            logits, feats = tap(images)
        columns = []
        for layer, distance in zip(self.layers, self.distances):
            maps = distance(feats[layer].to(distance.offset.dtype))  # (N, G, H', W')
            if self.class_conditional:
                w = self._group_weights(logits, distance.groups)[:, :, None, None].to(maps.dtype)  # (N, G, 1, 1)
                # where(): a class with weight 0 adds nothing, even where its distance overflowed
                maps = torch.where(w > 0, maps * w, torch.zeros_like(maps)).sum(1)  # (N, H', W')
            else:
                maps = maps[:, 0]  # (N, H', W')
            flat = maps.flatten(1)  # (N, H' W')
            s = flat.double().mean(1) if self.aggregate == "mean" else flat.amax(1).double()  # (N,)
            columns.append(s)
        layer_scores = torch.stack(columns, dim=1)  # (N, n_layers) float64
        z = (layer_scores - self.score_mean) / self.score_std  # (N, n_layers); one layer: mean 0, std 1
        if self.fusion == "max":
            combined = z.amax(1)  # (N,) float64
        elif self.fusion == "gaussian":
            combined = (z @ self.whitening.T).square().sum(1)  # z^T (R + ridge I)^-1 z
        else:
            combined = z.sum(1)
        score = combined.to(logits.dtype)
        score = torch.where(torch.isnan(score), torch.full_like(score, float("inf")), score)
        flagged = ~(score.double() <= self.threshold)
        return logits, score, flagged


def _warn_if_out_of_range(detector, dtype: torch.dtype) -> None:
    """Warn where the detector itself would score a layer in float64 (weights beyond ``dtype``'s square-root range)."""
    info = torch.finfo(dtype)
    low, high = info.tiny**0.5, info.max**0.5
    for layer, form in detector.forms_.items():
        values = [form.mean.abs().max()] + [w.abs().max() for w in (form.gain, form.diag) if w is not None]
        if any(v > high for v in values) or any(0 < v < low for v in values[1:]):
            warnings.warn(
                f"layer {layer!r}: the fitted form exceeds the range of {dtype} (activations near its limits); "
                "covguard scores it in float64 but the exported graph computes in the model's dtype and may overflow",
                RuntimeWarning,
                stacklevel=3,
            )


def export_guard(
    guard, path: str | Path, *, format: str = "onnx", opset: int = DEFAULT_OPSET
) -> Path:
    """Write the guard's classifier and scoring as one graph (see the module docstring).

    Parameters
    ----------
    guard : covguard.Guard
        Calibrated, with a SimpleMahalanobis or ClassMahalanobis detector.
    path : str or Path
        File to write (parent folders are created; an existing file is replaced). Written to a
        temporary file first, then renamed: never half-written.
    format : {"onnx", "torchscript"}
        ``onnx``: input ``images`` (N, C, H, W) with a dynamic batch axis, outputs ``logits``,
        ``score``, ``flagged``; metadata ``covguard`` holds the threshold, layers and input
        shape (JSON). ``torchscript``: a traced module returning the same tuple
        (``torch.jit.load(path)``).
    opset : int
        ONNX opset version.

    Returns
    -------
    Path
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {sorted(EXPORT_FORMATS)}; got {format!r}")
    if format == "onnx":
        try:
            import onnx
        except ImportError as err:
            raise ImportError("exporting to ONNX needs the onnx package: pip install 'covguard[export]'") from err
    detector = guard.detector
    guarded = GuardedModel(detector, threshold=guard.threshold_)
    C, H, W = guarded.input_shape
    dtype = guarded.distances[0].offset.dtype
    example = torch.rand(2, C, H, W, generator=torch.Generator().manual_seed(0), dtype=dtype).to(model_device(detector.model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=EXPORT_FORMATS[format], dir=path.parent)
    os.close(fd)
    try:
        # eval_mode on the classifier itself: its mode (not the wrapper's) is restored afterwards
        with eval_mode(detector.model), torch.no_grad(), warnings.catch_warnings():
            guarded.eval()
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding")
            # torch 2.13 deprecates the TorchScript tracer (both formats rest on it): still supported, said in the docs
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
            if format == "onnx":
                torch.onnx.export(
                    guarded, (example,), tmp, dynamo=False, opset_version=opset, input_names=[_INPUT],
                    output_names=list(_OUTPUTS), dynamic_axes={name: {0: "N"} for name in (_INPUT, *_OUTPUTS)},
                )
            else:
                torch.jit.save(torch.jit.trace(guarded, (example,)), tmp)
        if format == "onnx":
            proto = onnx.load(tmp)
            onnx.checker.check_model(proto)
            proto.doc_string = "covguard: classifier + patch-Mahalanobis guard; images (N, C, H, W) float in [0, 1]"
            entry = proto.metadata_props.add()
            entry.key, entry.value = "covguard", json.dumps(_metadata(guard, guarded))
            onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _metadata(guard, guarded: GuardedModel) -> dict:
    from covguard import __version__

    calibration = guard.calibration_
    return {
        "covguard_version": __version__,
        "detector": type(guard.detector).__name__,
        "layers": list(guarded.layers),
        "input_shape": list(guarded.input_shape),
        "threshold": calibration.threshold,
        "tpr": calibration.tpr,
        "inputs": {_INPUT: "(N, C, H, W) float in [0, 1]"},
        "outputs": {"logits": "(N, K)", "score": "(N,) larger = more anomalous", "flagged": "(N,) bool, score > threshold"},
    }


def verify_onnx(guard, path: str | Path, images: Tensor) -> dict[str, float]:
    """Run an exported ONNX file with onnxruntime and compare it with ``guard(images)``.

    Parameters
    ----------
    guard : covguard.Guard
    path : str or Path
        File written by :func:`export_guard`.
    images : Tensor of shape (N, C, H, W)

    Returns
    -------
    dict
        ``score_max_rel`` (max ``|onnx - covguard| / max(|covguard|, 1)`` over finite scores),
        ``logits_max_abs``, ``flags_differ`` (images flagged differently) and ``n``.
    """
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, score, flagged = session.run(list(_OUTPUTS), {_INPUT: images.cpu().numpy()})
    ref = guard(images)
    ref_logits = guard.detector.forward(images)[0].cpu().numpy()
    ref_score = ref.scores.cpu().double().numpy()
    finite = np.isfinite(ref_score)
    rel = np.abs(score.astype(np.float64)[finite] - ref_score[finite]) / np.maximum(np.abs(ref_score[finite]), 1.0)
    return {
        "n": int(images.shape[0]),
        "score_max_rel": float(rel.max()) if rel.size else 0.0,
        "logits_max_abs": float(np.abs(logits - ref_logits).max()),
        "flags_differ": int((flagged != ref.flagged.cpu().numpy()).sum()),
    }
