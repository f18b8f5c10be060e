"""One layer's patch Gaussians: the patch geometry, the fitted forms, distances as a convolution.

A :class:`PatchGaussian` owns one tapped layer: its patch geometry (``k x k`` patches of a
zero-padded map, ``D = C k^2``), the fitted :class:`~covguard.covariance.QuadraticForm` of each
group (estimated by an accumulator of :mod:`covguard.detectors.accumulators`), and the
squared-distance map of new feature maps. Options: each position's channel vector divided by its L2 norm before patches are
formed (``normalize="position"``, at fit and at score alike), and a shared *background* form
whose distance is subtracted from every patch's (relative distances).

Numerics at scoring time: distances are computed in the features' dtype, except when the
form does not fit that dtype (activations near 1e30 give precisions near 1e-60, which float32
flushes to zero): then in float64. Images whose distances still overflow are recomputed in
float64. Maps come back in the compute dtype, with the rows of images whose activations are not
finite marked.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from covguard.covariance import QuadraticForm
from covguard.detectors.class_weights import GroupRows
from covguard.patches import output_size, patch_mahalanobis_sq, patch_vectors, patch_vectors_at

__all__ = [
    "NORMALIZATIONS",
    "NORMALIZE_EPS",
    "PatchGaussian",
    "normalize_positions",
    "per_layer",
    "saturate",
]

NORMALIZATIONS = ("none", "position")
#: Added to each position's L2 norm by ``normalize="position"``: an all-zero channel vector
#: (a dead ReLU position) stays zero instead of dividing by zero.
NORMALIZE_EPS = 1e-12


def normalize_positions(f: Tensor) -> Tensor:
    """Each position's channel vector divided by its L2 norm plus :data:`NORMALIZE_EPS`.

    Parameters
    ----------
    f : Tensor of shape (N, C, H, W)

    Returns
    -------
    Tensor of shape (N, C, H, W)
        In the dtype of ``f``; the norms are reduced in float64 (no overflow of the squares).
    """
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True, dtype=torch.float64)  # (N, 1, H, W)
    return f / (norm + NORMALIZE_EPS).to(f.dtype)


def per_layer(value: int | Mapping[str, int], layers: tuple[str, ...], name: str) -> dict[str, int]:
    """Expand an int or a {layer: int} mapping to every layer, validating it."""
    if isinstance(value, Mapping):
        missing = [layer for layer in layers if layer not in value]
        if missing:
            raise ValueError(f"{name} mapping must give a value for every layer; missing {missing}")
        out = {layer: value[layer] for layer in layers}
    else:
        out = {layer: value for layer in layers}
    low = 1 if name == "kernel_size" else 0
    bad = {layer: v for layer, v in out.items() if isinstance(v, bool) or not isinstance(v, int) or v < low}
    if bad:
        raise ValueError(f"{name} must be an integer >= {low} (or a mapping of layer to one); got {bad}")
    return out



class PatchGaussian:
    """The patch Gaussians of one layer: geometry, the fitted form, and squared-distance maps.

    Parameters
    ----------
    layer : str
        Module name (for messages).
    kernel_size : int
        Patch side ``k``.
    padding : int
        Zero padding of the map before patch extraction (after normalization).
    normalize : {"none", "position"}
        ``"position"``: divide each position's channel vector by its L2 norm
        (:func:`normalize_positions`) before patches are formed, at fit and at score.
    """

    def __init__(self, layer: str, *, kernel_size: int, padding: int, normalize: str = "none") -> None:
        self.layer, self.kernel_size, self.padding, self.normalize = layer, kernel_size, padding, normalize
        self.channels_: int | None = None
        self.form_: QuadraticForm | None = None
        self.background_: QuadraticForm | None = None  # shared form subtracted (relative distances)
        self._cache: dict[tuple, tuple[QuadraticForm, QuadraticForm | None]] = {}

    def check_map(self, f: Tensor) -> None:
        """Raise ValueError unless ``f`` is a map (N, C, H, W) large enough, with the fitted C."""
        if f.ndim != 4:
            raise ValueError(f"layer {self.layer!r} must output a map (N, C, H, W); got shape {tuple(f.shape)}")
        k, pad = self.kernel_size, self.padding
        if min(f.shape[-2:]) + 2 * pad < k:
            raise ValueError(
                f"layer {self.layer!r} outputs a {f.shape[-2]}x{f.shape[-1]} map, too small for kernel_size={k} "
                f"with padding={pad}; use a smaller kernel_size for it or a larger input"
            )
        if self.channels_ is not None and self.channels_ != f.shape[1]:
            raise ValueError(f"layer {self.layer!r} must have C={self.channels_} channels (as at fit); got {f.shape[1]}")

    def _prepare(self, f: Tensor) -> Tensor:
        """The map patches are formed from: ``f`` itself or position-normalized."""
        return normalize_positions(f) if self.normalize == "position" else f

    def n_positions(self, f: Tensor) -> int:
        """Patch positions ``L`` per image of a map (N, C, H, W)."""
        return output_size(f.shape[-2], self.kernel_size, self.padding) * output_size(f.shape[-1], self.kernel_size, self.padding)

    def patches(self, f: Tensor, weights: Tensor | None, rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Patch vectors (M, D) of a map (N, C, H, W) and their group weights (M, K) from
        per-image weights (N, K), or None for one group: every patch (M = N L, image by image)
        or the rows ``n L + l`` given (M,), the others never unfolded."""
        f = self._prepare(f)
        if rows is None:
            p = patch_vectors(f, kernel_size=self.kernel_size, padding=self.padding)  # (N, L, D)
            w = None if weights is None else weights.repeat_interleave(p.shape[1], dim=0)  # (N L, K)
            return p.reshape(-1, p.shape[-1]), w  # (N L, D)
        p = patch_vectors_at(f, rows, kernel_size=self.kernel_size, padding=self.padding)  # (M, D)
        return p, None if weights is None else weights[rows.to(weights.device) // self.n_positions(f)]

    def set_form(self, form: QuadraticForm, channels: int, background: QuadraticForm | None = None) -> None:
        """Store the fitted form (and the background form of relative distances, K = 1) on the
        CPU, contiguous as a loaded file gives it (the same memory layout gives bit-identical scores)."""
        self.form_ = _stored(form)
        self.background_ = None if background is None else _stored(background)
        self.channels_ = channels
        self._cache = {}

    def _forms_for(self, dtype: torch.dtype, device: torch.device) -> tuple[QuadraticForm, QuadraticForm | None]:
        """The forms in ``dtype`` on ``device``, or in float64 where ``dtype`` cannot hold one."""
        key = (dtype, device)
        if key not in self._cache:
            fits = _fits(self.form_, dtype) and (self.background_ is None or _fits(self.background_, dtype))
            use = dtype if fits else torch.float64
            self._cache = {key: (self.form_.to(use, device), None if self.background_ is None else self.background_.to(use, device))}
        return self._cache[key]

    def _map(self, f: Tensor, forms: tuple[QuadraticForm, QuadraticForm | None], groups: GroupRows | None) -> Tensor:
        """Squared distances (N, H', W') in the dtype of the forms, less the background's."""
        form, background = forms
        dtype, k_size, pad = form.mean.dtype, self.kernel_size, self.padding
        f = f if f.dtype == dtype else f.to(dtype)
        if groups is None:
            out = patch_mahalanobis_sq(f, form, kernel_size=k_size, padding=pad)[:, 0]  # (N, H', W')
        else:
            size = (f.shape[0], *[output_size(n, k_size, pad) for n in f.shape[-2:]])
            out = None
            # Score each image only against the groups it weights: K times less work for top-1.
            for k, rows, w in groups.groups:  # rows (n_k,) or None for all, w (n_k, 1, 1) or None for 1
                d2 = patch_mahalanobis_sq(f if rows is None else f[rows], form.group(k), kernel_size=k_size, padding=pad)[:, 0]
                d2 = d2 if w is None else d2 * (w if w.dtype == dtype else w.to(dtype))  # (n_k, H', W')
                if rows is None:
                    out = d2 if out is None else out.add_(d2)  # (N, H', W')
                else:
                    out = torch.zeros(size, dtype=dtype, device=f.device) if out is None else out
                    out.index_add_(0, rows, d2)
            out = torch.zeros(size, dtype=dtype, device=f.device) if out is None else out  # (N, H', W')
        if background is not None:  # the weights of each image sum to 1: sum_k w_k (d2_k - d2_shared)
            out = out - patch_mahalanobis_sq(f, background, kernel_size=k_size, padding=pad)[:, 0]  # (N, H', W')
        return out

    def raw_map(self, f: Tensor, groups: GroupRows | None) -> Tensor:
        """Squared distance of every patch (less the background's), unchecked: the map (N, H', W')
        of :meth:`distance_map` (same arguments) before its non-finite values are inspected."""
        self.check_map(f)
        return self._map(self._prepare(f), self._forms_for(f.dtype, f.device), groups)

    def distance_map(self, f: Tensor, groups: GroupRows | None) -> tuple[Tensor, Tensor | None]:
        """Squared distance of every patch (less the background's, for relative distances) and
        which images have finite activations: :meth:`check_finite` of :meth:`raw_map`.

        Parameters
        ----------
        f : Tensor of shape (N, C, H, W)
        groups : GroupRows, optional
            Weight of each group in each image's distance (None: the one group).

        Returns
        -------
        map : Tensor of shape (N, H', W')
            In the features' dtype, or float64 where the form needs it; finite wherever the
            activations are finite, except where float64 itself overflows. Non-negative but for
            relative distances (a difference of two squared distances).
        finite : BoolTensor of shape (N,) or None
            Images whose activations are finite; None when every distance is finite.
        """
        return self.check_finite(f, groups, self.raw_map(f, groups))

    def check_finite(self, f: Tensor, groups: GroupRows | None, m: Tensor) -> tuple[Tensor, Tensor | None]:
        """The map ``m = raw_map(f, groups)`` with its overflows recomputed in float64, and
        which images have finite activations (as :meth:`distance_map` returns them).

        Every activation lies in some patch and reaches its distance with a nonzero weight, so a
        non-finite activation always gives a non-finite distance: the (C times larger) feature
        map is inspected only for images whose distances are not all finite. Those whose
        activations are finite overflowed: they are recomputed in float64.

        Parameters
        ----------
        f : Tensor of shape (N, C, H, W)
        groups : GroupRows, optional
        m : Tensor of shape (N, H', W')

        Returns
        -------
        map : Tensor of shape (N, H', W')
        finite : BoolTensor of shape (N,) or None
            None when every distance is finite.
        """
        bad = ~torch.isfinite(m).flatten(1).all(1)  # (N,)
        if not bool(bad.any()):
            return m, None
        ok = torch.isfinite(f).flatten(1).all(1)  # (N,)
        redo = (ok & bad).nonzero().flatten()
        if len(redo) and m.dtype != torch.float64:  # overflow in the features' dtype: recompute in float64
            bg = self.background_
            forms64 = (self.form_.to(torch.float64, f.device), None if bg is None else bg.to(torch.float64, f.device))
            sub = None if groups is None else groups.subset(redo)
            m = m.double().index_copy(0, redo, self._map(self._prepare(f[redo]), forms64, sub))
        return m, ok


def _stored(form: QuadraticForm) -> QuadraticForm:
    """``form`` on the CPU, every tensor contiguous."""
    fields = (form.mean, form.proj, form.gain, form.diag)
    return QuadraticForm(*(None if t is None else t.cpu().contiguous() for t in fields))


def _fits(form: QuadraticForm, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` can score with ``form``: its mean and its largest weights within ``sqrt`` of the range.

    The distances are sums of squared deviations times weights (``gain``, ``diag``): with the
    mean below ``sqrt(max)`` and the largest weight within ``[sqrt(tiny), sqrt(max)]`` they stay
    normal numbers. Projections are orthonormal: not checked.
    """
    info = torch.finfo(dtype)
    low, high = info.tiny**0.5, info.max**0.5
    if form.mean.abs().max() > high:
        return False
    for weights in (form.gain, form.diag):
        if weights is not None:
            largest = weights.abs().max()
            if largest > high or 0 < largest < low:
                return False
    return True


def saturate(values: Tensor, finite: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Cast (N, ...) values to ``dtype``: rows with finite activations (all rows when ``finite``
    is None) saturate at its largest finite value (NaN included); the other rows keep +inf
    where they are not finite."""
    big = torch.finfo(dtype).max
    values = torch.nan_to_num(values, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    if finite is None:
        return values.clamp(-big, big).to(dtype)
    rows = finite.reshape(-1, *([1] * (values.ndim - 1)))
    return torch.where(rows, values.clamp(-big, big), values).to(dtype)
