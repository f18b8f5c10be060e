"""Derive a patch detector with other hyperparameters from a fitted one, without a pass over the fit data.

What the fitted state allows (see :meth:`~covguard.detectors.patch.PatchMahalanobis.refit`):

- scoring changes (``aggregate``, ``top_fraction``, ``fusion``; Class: ``scoring``, ``top_m``,
  ``relative=False``) keep the fitted forms;
- estimation changes (``covariance``, ``rank``, ``shrinkage``, ``eps``; Class: ``relative=True``
  from absolute distances, whose shared form is the pool of the class moments) re-estimate the
  forms from the kept moments;
- the layers, the patch geometry, ``normalize`` and what the statistics were accumulated with
  (``class_weights``, ``basis_rank``, ``keep_moments``) describe the data: they need a new fit.

The copy's layer fusion is fitted anew on held-out images wherever it needs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from covguard.detectors.base import check_is_fitted

__all__ = ["ESTIMATION", "FIXED", "refit_patch_detector"]

#: Parameters the fitted statistics fix.
FIXED = ("layers", "kernel_size", "padding", "normalize", "class_weights", "basis_rank", "keep_moments")
#: Parameters re-estimated from the kept moments.
ESTIMATION = ("covariance", "rank", "shrinkage", "eps")


def refit_patch_detector(detector: Any, *, holdout: Iterable | None, progress: bool, changes: dict[str, Any]) -> Any:
    """A fitted copy of a :class:`~covguard.detectors.patch.PatchMahalanobis` with ``changes``.

    Parameters
    ----------
    detector : PatchMahalanobis
        Fitted.
    holdout : iterable or None
        Held-out in-distribution images that fit the copy's layer fusion; None only where the
        copy needs none (one layer, not ``fusion="gaussian"``).
    progress : bool
    changes : dict
        Constructor parameters to change.

    Returns
    -------
    PatchMahalanobis
        Sharing the model and the forms or the moments of ``detector``.
    """
    check_is_fitted(detector)
    params = detector.get_params()
    fixed = sorted(name for name in set(changes) & set(FIXED) if name not in params or changes[name] != params[name])
    if fixed:
        raise ValueError(f"refit cannot change {fixed}: the fitted statistics fix them; fit a new detector")
    other = detector.clone(**changes)
    estimation = sorted(set(changes) & set(ESTIMATION))
    if other.relative_distances and not detector.relative_distances:
        estimation.append("relative")
    if estimation and not detector.moments_:
        raise ValueError(f"refit of {estimation} needs the fitted moments: construct the detector with keep_moments=True")
    if holdout is None and other.needs_holdout:
        raise ValueError("holdout must hold in-distribution images to fit the fusion of the layer scores")
    if estimation:
        other.fit_moments(detector.moments_, input_shape=detector.input_shape_)
    else:
        other.set_forms(
            detector.forms_, detector.channels_,
            background_forms=detector.background_forms_ if other.relative_distances else None,
            input_shape=detector.input_shape_, model_sha256=detector.model_sha256_,
        )
        other.moments_ = detector.moments_
    if other.needs_holdout:
        other.standardize(holdout, progress=progress)
    return other
