"""The naive patch-Mahalanobis scorer that the timing benchmark measures the fast path against.

:class:`NaiveReference` computes a fitted detector's layer scores the textbook way: explicit
``unfold`` into patch vectors, then ``(p - mu)^T P (p - mu)`` with the dense precision ``P``.
``covguard bench timing`` times it next to the detector (the ``naive_overhead`` and
``speedup_vs_naive`` columns) and reports :func:`max_relative_error` between the two paths. The
tests check the fast path against their own per-patch oracle (``tests/bench/test_naive.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from covguard.detectors import ClassMahalanobis, PatchMahalanobis
from covguard.features import FeatureTap
from covguard.patches import patch_vectors

__all__ = ["NaiveReference", "max_relative_error"]


class NaiveReference:
    """The textbook computation of a fitted patch detector's scores, for timing and agreement checks.

    Every patch is unfolded into a vector ``p`` (:func:`~covguard.patches.patch_vectors`) and scored as
    ``(p - mu)^T P (p - mu)`` with the dense ``D x D`` precision ``P`` of its form
    (``P = proj diag(gain) proj^T + diag(diag)``), row-wise; class detectors score each image
    against the classes it weights (top-1, or the renormalized top-m probabilities).

    Parameters
    ----------
    detector : PatchMahalanobis
        A fitted Simple or Class detector.
    dtype : torch.dtype, default torch.float32
        Dtype of ``P`` and of the computation.
    """

    def __init__(self, detector: PatchMahalanobis, *, dtype: torch.dtype = torch.float32) -> None:
        self.detector = detector
        self.dtype = dtype
        device = next(detector.model.parameters()).device
        self.means: dict[str, Tensor] = {}
        self.precisions: dict[str, Tensor] = {}
        for layer, form in detector.forms_.items():
            K, D = form.mean.shape
            P = torch.zeros(K, D, D, dtype=torch.float64)
            if form.proj is not None:
                P += torch.einsum("kdr,kr,ker->kde", form.proj.double(), form.gain.double(), form.proj.double())
            if form.diag is not None:
                P += torch.diag_embed(form.diag.double())
            self.means[layer] = form.mean.to(dtype=dtype, device=device)  # (K, D)
            self.precisions[layer] = P.to(dtype=dtype, device=device)  # (K, D, D)

    def _class_weights(self, logits: Tensor) -> Tensor | None:
        """(N, K) weights of each image's classes, or None for a Simple detector."""
        det = self.detector
        if not isinstance(det, ClassMahalanobis):
            return None
        if det.scoring == "top1":
            return F.one_hot(logits.argmax(1), logits.shape[1]).to(self.dtype)
        probs = logits.double().softmax(1)  # (N, K)
        top_p, top_k = probs.topk(min(det.top_m, probs.shape[1]), dim=1)  # (N, m)
        return torch.zeros_like(probs).scatter_(1, top_k, top_p / top_p.sum(1, keepdim=True)).to(self.dtype)

    def layer_scores(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Aggregated squared distances, shape (N, n_layers), like ``detector.layer_scores``."""
        det = self.detector
        weights = self._class_weights(logits)  # (N, K) or None
        cols = []
        for layer in det.layers:
            f = feats[layer].to(self.dtype)
            g = det.gaussians[layer]
            p = patch_vectors(f, kernel_size=g.kernel_size, padding=g.padding)  # (N, L, D) explicit unfold
            mean, P = self.means[layer], self.precisions[layer]
            if weights is None:
                dev = p - mean[0]  # (N, L, D)
                d2 = ((dev @ P[0]) * dev).sum(-1)  # (N, L)
            else:
                d2 = torch.zeros(p.shape[:2], dtype=self.dtype, device=p.device)  # (N, L)
                for k in (weights > 0).any(0).nonzero().flatten().tolist():
                    rows = (weights[:, k] > 0).nonzero().flatten()
                    dev = p[rows] - mean[k]  # (n_k, L, D)
                    d2[rows] += weights[rows, k, None] * ((dev @ P[k]) * dev).sum(-1)
            cols.append(d2.mean(1) if det.aggregate == "mean" else d2.amax(1))
        return torch.stack(cols, dim=1)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """Combined score (N,): one forward pass capturing the layers, naive distances, z-scored sum."""
        det = self.detector
        with FeatureTap(det.model, det.layers) as tap:
            logits, feats = tap(x)
        scores = self.layer_scores(logits, feats)
        return det.combine(scores)


def max_relative_error(detector: PatchMahalanobis, naive: NaiveReference, x: Tensor) -> float:
    """max over images and layers of ``|fast - naive| / |naive|`` for the per-layer scores."""
    with torch.no_grad():
        fast = detector.layer_scores(x)  # (N, n_layers) float64
        with FeatureTap(detector.model, detector.layers) as tap:
            logits, feats = tap(x)
        ref = naive.layer_scores(logits, feats).double()
    return float(((fast - ref).abs() / ref.abs().clamp_min(1e-30)).max())
