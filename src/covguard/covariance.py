"""Covariance estimators and the precision forms that scoring needs.

Every estimator turns moments (``n``, mean, scatter of K groups, float64) into a
:class:`QuadraticForm`: the squared Mahalanobis distance is written as

``d2(p) = sum_d diag_d (p_d - mean_d)^2 + sum_r gain_r (proj_r^T (p - mean))^2``,

so that one scorer (``covguard.patches``) serves every form:

- ``full``: whitening by the Cholesky factor ``cov = L L^T``: ``d2 = ||L^-1 (p - mean)||^2``, i.e.
  ``proj`` = the columns of ``L^-T`` scaled to unit norm and ``gain`` = their squared norms, no
  diag. ``proj`` is upper triangular, which the convolution scorer exploits (about half the
  multiply-adds of a dense ``D x D`` kernel), and the factorization costs a fraction of an
  eigendecomposition (D = 4608: about 2 s instead of 100 s). A covariance too close to singular
  for Cholesky (no ridge) falls back to eigenvectors ``proj = V``, ``gain = 1 / l`` (floored).
- ``diag``: ``diag = 1 / var``, no proj.
- ``lowrank`` (probabilistic PCA, Tipping & Bishop 1999): top-``k`` eigenpairs ``U, l`` and the
  isotropic residual ``s2`` (mean of the other eigenvalues):
  ``P = U diag(1/l - 1/s2) U^T + I / s2``, i.e. ``proj = U``, ``gain = 1/l - 1/s2`` (<= 0) and
  ``diag = 1/s2``, with ``s2 = (tr(cov) - sum(l)) / (D - k)``. With ``k = D`` there is no residual
  and it equals ``full``. For large ``D`` the top ``k`` eigenpairs come from a block subspace
  iteration (Rayleigh-Ritz, converged to a residual of ``1e-9`` of the largest eigenvalue), not a
  full eigendecomposition.

Regularization happens on the covariance before factorization: ``ridge`` adds
``eps * tr(S) / D * I`` (relative ridge), ``oas`` uses the Oracle Approximating Shrinkage of
Chen et al. (2010) exactly as ``sklearn.covariance.oas`` computes it from the ML covariance.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor

from covguard.stats import Moments

__all__ = [
    "QuadraticForm", "CovarianceConfig", "diagonal_form", "regularize", "oas_shrinkage", "quadratic_form", "COVARIANCE_FORMS"]

logger = logging.getLogger(__name__)

COVARIANCE_FORMS = ("full", "diag", "lowrank")
SHRINKAGE = ("ridge", "oas")


@dataclass(frozen=True)
class QuadraticForm:
    """A squared Mahalanobis distance for K groups, in scoring form.

    Attributes
    ----------
    mean : Tensor of shape (K, D)
    proj : Tensor of shape (K, D, r) or None
        Unit-norm projection directions: orthonormal eigenvectors (``lowrank``, and ``full``
        when Cholesky fails), or the upper-triangular columns of ``L^-T`` (``full``).
    gain : Tensor of shape (K, r) or None
        Signed weight of each squared projection (present exactly when ``proj`` is).
    diag : Tensor of shape (K, D) or None
        Per-coordinate weights of the squared deviations.
    """

    mean: Tensor
    proj: Tensor | None
    gain: Tensor | None
    diag: Tensor | None
    # Derived objects built once per form (group views, convolution kernels); not state.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> QuadraticForm:
        """Copy with tensors converted to ``dtype`` / moved to ``device``."""

        def conv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return QuadraticForm(conv(self.mean), conv(self.proj), conv(self.gain), conv(self.diag))

    def group(self, k: int) -> QuadraticForm:
        """The form of group ``k`` alone (K = 1), a view; the same object on every call."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[k : k + 1]

        key = ("group", k)
        if key not in self._cache:
            self._cache[key] = QuadraticForm(self.mean[k : k + 1], pick(self.proj), pick(self.gain), pick(self.diag))
        return self._cache[key]

    def logdet(self) -> Tensor:
        """Log-determinant of each group's precision ``P = proj diag(gain) proj^T + diag(diag)``, (K,).

        ``-logdet P`` is the log-determinant of the modelled covariance, the normalizer of the
        Gaussian log-density ``-(d2 + D log 2 pi - logdet P) / 2``. Computed in float64: from the
        diagonal alone, from ``|det proj|`` and the gains (``full``), or with the matrix
        determinant lemma (``lowrank``: ``diag + proj diag(gain) proj^T``).
        """
        key = ("logdet",)
        if key not in self._cache:
            diag = None if self.diag is None else self.diag.double()
            if self.proj is None:
                out = diag.log().sum(-1)
            else:
                proj, gain = self.proj.double(), self.gain.double()  # (K, D, r), (K, r)
                if diag is None:  # full: proj square
                    out = 2 * torch.linalg.slogdet(proj)[1] + gain.log().sum(-1)
                else:  # det(diag + V G V^T) = det(diag) det(I_r + G V^T diag^-1 V)
                    inner = torch.einsum("kdr,kd,kds->krs", proj, 1.0 / diag, proj) * gain[:, :, None]  # (K, r, r)
                    eye = torch.eye(proj.shape[-1], dtype=torch.float64, device=proj.device)
                    out = diag.log().sum(-1) + torch.linalg.slogdet(eye + inner)[1]
            self._cache[key] = out
        return self._cache[key]

    def distance_sq(self, p: Tensor) -> Tensor:
        """Squared distance of plain vectors, row-wise (no convolution).

        Parameters
        ----------
        p : Tensor of shape (M, D)

        Returns
        -------
        Tensor of shape (M, K)
        """
        dev = p[:, None, :] - self.mean[None]  # (M, K, D)
        out = torch.zeros(dev.shape[:2], dtype=p.dtype, device=p.device)
        if self.diag is not None:
            out = out + (dev**2 * self.diag[None]).sum(-1)
        if self.proj is not None:
            z = torch.einsum("mkd,kdr->mkr", dev, self.proj)  # (M, K, r)
            out = out + (z**2 * self.gain[None]).sum(-1)
        return out


@dataclass(frozen=True)
class CovarianceConfig:
    """How to turn moments into a quadratic form.

    Attributes
    ----------
    form : str
        ``"full"``, ``"diag"`` or ``"lowrank"``.
    shrinkage : str
        ``"ridge"`` (add ``eps * tr(S)/D * I``) or ``"oas"``.
    eps : float
        Relative ridge; 0.01 reproduces the original authors' ``tr(S)/D/100 * I``.
    rank : int
        Number of eigenpairs kept by ``lowrank`` (clipped to D).
    """

    form: str = "full"
    shrinkage: str = "ridge"
    eps: float = 0.01
    rank: int = 64

    def __post_init__(self) -> None:
        if self.form not in COVARIANCE_FORMS:
            raise ValueError(f"covariance must be one of {COVARIANCE_FORMS}; got {self.form!r}")
        if self.shrinkage not in SHRINKAGE:
            raise ValueError(f"shrinkage must be one of {SHRINKAGE}; got {self.shrinkage!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real):
            raise TypeError(f"eps must be a real number >= 0; got {type(self.eps).__name__} {self.eps!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be >= 0 and finite; got {self.eps}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
            raise TypeError(f"rank must be an integer >= 1; got {type(self.rank).__name__} {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1; got {self.rank}")


def oas_shrinkage(cov: Tensor, n: Tensor) -> Tensor:
    """OAS shrunk covariance, as ``sklearn.covariance.oas`` computes it.

    Parameters
    ----------
    cov : Tensor of shape (K, D, D)
        Maximum-likelihood covariances.
    n : Tensor of shape (K,)
        Number of samples behind each.

    Returns
    -------
    Tensor of shape (K, D, D)
    """
    D = cov.shape[-1]
    alpha = (cov**2).mean(dim=(-2, -1))  # (K,)
    mu = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / D  # (K,)
    num = alpha + mu**2
    den = (n + 1) * (alpha - mu**2 / D)
    shrink = torch.where(den == 0, torch.ones_like(den), torch.clamp(num / torch.where(den == 0, 1.0, den), max=1.0))
    eye = torch.eye(D, dtype=cov.dtype, device=cov.device)
    return (1 - shrink)[:, None, None] * cov + (shrink * mu)[:, None, None] * eye


def regularize(cov: Tensor, n: Tensor, config: CovarianceConfig) -> Tensor:
    """Apply the configured shrinkage to ML covariances (K, D, D); returns (K, D, D)."""
    if config.shrinkage == "oas":
        return oas_shrinkage(cov, n)
    D = cov.shape[-1]
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / D  # (K,)
    eye = torch.eye(D, dtype=cov.dtype, device=cov.device)
    return cov + (config.eps * scale)[:, None, None] * eye


def _floor(values: Tensor, cov: Tensor) -> Tensor:
    """Clamp eigenvalues/variances at a tiny fraction of the mean variance, so precisions stay finite."""
    D = cov.shape[-1]
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / D  # (K,)
    tiny = torch.clamp(scale * 1e-12, min=torch.finfo(torch.float64).tiny)
    return torch.maximum(values, tiny.reshape(-1, *([1] * (values.ndim - 1))))


def quadratic_form(moments: Moments, config: CovarianceConfig) -> QuadraticForm:
    """Estimate covariances from ``moments`` and return their scoring form (float64).

    Parameters
    ----------
    moments : Moments
        K groups of D-dimensional moments, every group with positive weight.
    config : CovarianceConfig

    Returns
    -------
    QuadraticForm
        ``mean`` (K, D); ``proj`` (K, D, r) and/or ``diag`` (K, D) as the form requires.
    """
    cov = regularize(moments.covariance(), moments.n, config)  # (K, D, D)
    D = moments.dim
    if config.form == "diag":
        var = _floor(torch.diagonal(cov, dim1=-2, dim2=-1), cov)  # (K, D)
        return QuadraticForm(moments.mean, None, None, 1.0 / var)
    if config.form == "full" or config.rank >= D:
        proj, gain = _whitening(cov)
        return QuadraticForm(moments.mean, proj, gain, None)
    k = config.rank
    top_vals, top_vecs = _top_eigenpairs(cov, k)  # (K, k), (K, D, k)
    top_vals = _floor(top_vals, cov)
    trace = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)  # (K,)
    s2 = _floor((trace - top_vals.sum(-1)) / (D - k), cov)  # (K,) isotropic residual: mean of the other eigenvalues
    gain = 1.0 / top_vals - 1.0 / s2[:, None]  # (K, k), <= 0: top directions are down-weighted
    return QuadraticForm(moments.mean, top_vecs, gain, (1.0 / s2)[:, None].expand(-1, D).clone())



def diagonal_form(n: Tensor, mean: Tensor, m2: Tensor, config: CovarianceConfig) -> QuadraticForm:
    """The diagonal scoring form from per-coordinate statistics, as :func:`quadratic_form` gives it
    for ``form="diag"`` with ridge shrinkage from full moments.

    Parameters
    ----------
    n : Tensor of shape (K,)
        Total weight of each group, positive.
    mean : Tensor of shape (K, D)
    m2 : Tensor of shape (K, D)
        Centered sums of squares.
    config : CovarianceConfig
        ``form="diag"``, ``shrinkage="ridge"``.
    """
    if config.form != "diag" or config.shrinkage != "ridge":
        raise ValueError(f"diagonal statistics give form='diag' with ridge shrinkage; got {config.form!r}, {config.shrinkage!r}")
    var = m2.double() / n.double()[:, None]  # (K, D) ML variances
    scale = var.mean(-1, keepdim=True)  # (K, 1) tr(S) / D
    var = var + config.eps * scale
    tiny = torch.clamp(var.mean(-1, keepdim=True) * 1e-12, min=torch.finfo(torch.float64).tiny)  # as _floor
    return QuadraticForm(mean.double(), None, None, 1.0 / torch.maximum(var, tiny))


def _whitening(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-norm ``proj`` (K, D, D) and ``gain`` (K, D) with ``proj diag(gain) proj^T = cov^-1``.

    Cholesky ``cov = L L^T``: ``cov^-1 = L^-T L^-1``, so the columns of ``L^-T`` (upper
    triangular), scaled to unit norm, with their squared norms as gains. Groups whose smallest
    pivot falls below the eigenvalue floor (near-singular, no ridge) use the floored
    eigendecomposition instead.
    """
    K, D, _ = cov.shape
    L, info = torch.linalg.cholesky_ex(cov)  # (K, D, D) lower
    pivots = torch.diagonal(L, dim1=-2, dim2=-1) ** 2  # (K, D)
    floor = _floor(torch.zeros_like(pivots[:, :1]), cov) * 1e4  # (K, 1): 1e-8 of the mean variance
    ok = (info == 0) & (pivots >= floor).all(-1)  # (K,)
    eye = torch.eye(D, dtype=cov.dtype, device=cov.device).expand(K, D, D)
    inv_l = torch.linalg.solve_triangular(torch.where(ok[:, None, None], L, eye), eye, upper=False)  # (K, D, D) L^-1
    norms = torch.linalg.vector_norm(inv_l, dim=-1)  # (K, D): norm of each row of L^-1
    proj = inv_l.mT / norms[:, None, :]  # (K, D, D): unit columns of L^-T
    gain = norms**2
    if not ok.all():
        bad = (~ok).nonzero().flatten()
        evals, evecs = torch.linalg.eigh(cov[bad])  # (b, D), (b, D, D)
        proj[bad], gain[bad] = evecs, 1.0 / _floor(evals, cov[bad])
    return proj, gain


# Dimensions above which the top eigenpairs come from subspace iteration instead of ``eigh``.
_EIGH_MAX_DIM = 1536
# Subspace iteration: residuals (relative to the largest eigenvalue) accepted once they stall.
_STALL_TOL = 1e-6
_STALL_ITERS = 5


def _top_eigenpairs(cov: Tensor, k: int, *, tol: float = 1e-9, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenvalues (K, k) ascending and their eigenvectors (K, D, k).

    ``eigh`` for ``D <= _EIGH_MAX_DIM``; above, block subspace iteration with Rayleigh-Ritz on
    ``b = 2k + 16`` vectors, until every Ritz residual ``||cov v - l v||`` is below
    ``tol * l_max`` (falls back to ``eigh`` if that takes more than ``max_iter`` iterations).
    Costs ``O(D^2 b)`` per iteration instead of the ``O(D^3)`` of a full decomposition.

    When ``k`` exceeds the rank of the sample covariance (few samples in a class), the last
    eigenvalues kept sit on the flat ridge plateau, where eigenvectors are not unique and the
    residuals stall just above ``tol``: residuals below ``_STALL_TOL * l_max`` that stop
    improving (by half over ``_STALL_ITERS`` iterations) are accepted as converged. Any vector
    of a plateau gives the same probabilistic-PCA model.
    """
    K, D, _ = cov.shape
    b = min(D, 2 * k + 16)
    if D <= _EIGH_MAX_DIM or b >= D // 2:
        evals, evecs = torch.linalg.eigh(cov)  # ascending: (K, D), (K, D, D)
        return evals[:, D - k :], evecs[:, :, D - k :]
    gen = torch.Generator(device=cov.device).manual_seed(0)
    q = torch.linalg.qr(torch.randn(K, D, b, generator=gen, dtype=cov.dtype, device=cov.device))[0]  # (K, D, b)
    history: list[float] = []  # worst relative residual of each iteration
    for it in range(max_iter):
        z = cov @ q  # (K, D, b)
        t = q.mT @ z  # (K, b, b) Rayleigh quotient
        vals, vecs = torch.linalg.eigh((t + t.mT) / 2)  # ascending
        vals, vecs = vals[:, b - k :], vecs[:, :, b - k :]  # (K, k), (K, b, k)
        ritz = q @ vecs  # (K, D, k)
        residual = torch.linalg.vector_norm(z @ vecs - ritz * vals[:, None, :], dim=1)  # (K, k)
        worst = float((residual / vals[:, -1:].abs().clamp_min(torch.finfo(cov.dtype).tiny)).max())
        history.append(worst)
        stalled = len(history) > _STALL_ITERS and worst <= _STALL_TOL and worst > history[-1 - _STALL_ITERS] / 2
        if worst <= tol or stalled:
            logger.debug("top-%d eigenpairs of D=%d: residual %.1e after %d subspace iterations", k, D, worst, it + 1)
            return vals, ritz
        q = torch.linalg.qr(z)[0]
    logger.info("subspace iteration for the top-%d eigenpairs of D=%d did not converge; using eigh", k, D)
    evals, evecs = torch.linalg.eigh(cov)
    return evals[:, D - k :], evecs[:, :, D - k :]
