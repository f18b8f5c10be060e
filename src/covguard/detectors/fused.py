"""Fused detector: several detectors of one model, each score a conformal p-value, combined by a
rule fixed in advance (Fisher's ``-2 sum log p`` or Sidak-corrected min-p).

Every member's score is turned into an upper-tail p-value against that member's own scores on
held-out in-distribution images (the calibration set, never test data), with an exponential tail
beyond the largest calibration score (:mod:`covguard.pvalues` has the formulas). All members read
one forward pass over the union of their layers.

The score path, features level then model level::

    members_scores_features(logits, feats)  {member: (N,)} each member's raw score
    log_p_values(member_scores)             (N, M) float64, log p of each member
    combine(member_scores)                  (N,) the rule's score, in the model's dtype
    score_features(logits, feats)           combine(members_scores_features(logits, feats))

    members_scores(x), score(x)             the same from images (one forward pass)

Learned state (what persistence must keep besides each member's own state): ``rule``,
``tail_size``, the member names in order, ``calibration_`` ({member: sorted float64 scores (n,)})
and ``input_shape_``; ``tail_scales_`` is derived from ``calibration_`` by :meth:`set_calibration`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from covguard import pvalues
from covguard.detectors.base import Detector, check_is_fitted
from covguard.detectors.multi import fit_detectors
from covguard.detectors.patch_gaussian import saturate
from covguard.features import model_dtype, parameter_sha256

__all__ = ["FusedDetector"]

_NO_PARTIAL_FIT = (
    "FusedDetector does not fit batch by batch: fit its members (fit_detectors or each one's fit), "
    "then calibrate it on held-out images (calibrate, calibrate_features or set_calibration)"
)


class FusedDetector(Detector):
    """Members' scores as conformal p-values against held-out in-distribution scores, combined.

    Parameters
    ----------
    members : dict of str to Detector
        Named detectors of one model object, fitted or not (fitted ones are kept as they are).
        A member that overrides ``score`` is refused: ODIN perturbs its input first, so it
        cannot share the forward pass; score it on its own and combine its p-values with
        :mod:`covguard.pvalues`.
    rule : {"fisher", "minp"}, default "fisher"
        ``"fisher"``: ``-2 sum_j log p_j``; ``"minp"``: ``-log(1 - (1 - min_j p_j)^M)`` (Sidak).
    tail_size : int, default 20
        ``k``, the largest calibration scores (as exceedances over the ``(k + 1)``-th largest)
        that fit each member's exponential tail; clipped to ``n - 1``.

    Attributes
    ----------
    calibration_ : dict of str to Tensor of shape (n,), or None
        Each member's calibration scores, sorted ascending, float64, on the CPU.
    tail_scales_ : dict of str to float, or None
        Each member's tail scale ``sigma`` (:func:`covguard.pvalues.tail_scale`).

    Notes
    -----
    A member whose score is not finite (NaN or inf: non-finite activations, a failure) gets
    ``p = 0``, so the fused score is +inf and a :class:`~covguard.Guard` flags the input; a
    warning names the member. Calibrate a Guard's threshold on other held-out images than the
    members' calibration: a calibration image counts itself in its own p-value.

    Examples
    --------
    >>> from torch import nn
    >>> from covguard.detectors.knn import KNN
    >>> from covguard.detectors.msp import MSP
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> x, x_cal = torch.rand(64, 1, 8, 8), torch.rand(32, 1, 8, 8)
    >>> fused = FusedDetector({"msp": MSP(model), "knn": KNN(model, k=5, feature_layer="2")}, rule="minp")
    >>> fused.fit([x], calibration=[x_cal], progress=False).score(x[:5]).shape
    torch.Size([5])
    >>> other = FusedDetector(fused.members, rule="fisher").set_calibration(fused.calibration_)  # no refit
    """

    def __init__(self, members: Mapping[str, Detector], *, rule: str = "fisher", tail_size: int = 20) -> None:
        members = _check_members(members)
        first = next(iter(members.values()))
        super().__init__(first.model, layers=dict.fromkeys(layer for det in members.values() for layer in det.layers))
        if rule not in pvalues.RULES:
            raise ValueError(f"rule must be one of {sorted(pvalues.RULES)}; got {rule!r}")
        if isinstance(tail_size, bool) or not isinstance(tail_size, int) or tail_size < 1:
            raise ValueError(f"tail_size must be an int >= 1; got {tail_size!r}")
        self.members = members
        self.rule = rule
        self.tail_size = tail_size
        self.input_shape_ = _common_input_shape(members)
        self.calibration_: dict[str, Tensor] | None = None
        self.tail_scales_: dict[str, float] | None = None

    @property
    def is_fitted(self) -> bool:
        return self.calibration_ is not None and all(det.is_fitted for det in self.members.values())

    def get_params(self) -> dict[str, Any]:
        """``members`` (the same detector objects), ``rule`` and ``tail_size`` as given."""
        return {"members": dict(self.members), "rule": self.rule, "tail_size": self.tail_size}

    def clone(self, **changes: Any) -> FusedDetector:
        """A new, unfitted fused detector: unfitted clones of the members unless ``members`` is given."""
        params = self.get_params()
        unknown = sorted(set(changes) - set(params))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameters {unknown}; it takes {sorted(params)}")
        params["members"] = {name: det.clone() for name, det in self.members.items()}
        return type(self)(**{**params, **changes})

    # ---- fitting: the members, then the calibration -------------------------------------------

    def fit(
        self, loader: Iterable | None, *, calibration: Iterable, holdout: Iterable | None = None, progress: bool = True
    ) -> FusedDetector:
        """Fit the unfitted members together (:func:`fit_detectors`), then :meth:`calibrate`.

        Parameters
        ----------
        loader : iterable of Tensor (N, C, H, W) or of tuples (x, y), or None
            In-distribution training images (and labels, for members that need them); not read
            (may be None) when every member is fitted already.
        calibration : iterable of Tensor (N, C, H, W) or of tuples (x, y)
            Held-out in-distribution images, neither training nor test images.
        holdout : iterable, optional
            Held-out images that standardize multi-layer patch members (:func:`fit_detectors`).
        progress : bool

        Returns
        -------
        FusedDetector
            ``self``.
        """
        todo = {name: det for name, det in self.members.items() if not det.is_fitted}
        if todo:
            if loader is None:
                raise ValueError(f"loader must hold training images: members {sorted(todo)} are not fitted")
            fit_detectors(list(todo.values()), loader, holdout=holdout, progress=progress)
        return self.calibrate(calibration, progress=progress)

    def calibrate(self, loader: Iterable, *, progress: bool = True) -> FusedDetector:
        """Score held-out in-distribution images with every member (one forward pass per batch)
        and keep the scores as the calibration (:meth:`set_calibration`).

        Parameters
        ----------
        loader : iterable of Tensor (N, C, H, W) or of tuples (x, y)
            Held-out in-distribution images; at least 2.

        Returns
        -------
        FusedDetector
            ``self``.
        """
        chunks: dict[str, list[Tensor]] = {name: [] for name in self.members}
        shape = None
        for x, logits, feats, _ in self._forward_loader(loader, progress, f"calibrate {type(self).__name__}"):
            shape = shape or tuple(x.shape[1:])
            for name, s in self.members_scores_features(logits, feats).items():
                chunks[name].append(s.cpu())
        if shape is None:
            raise ValueError("calibration loader is empty: calibrate needs held-out in-distribution images")
        return self.set_calibration({name: torch.cat(c) for name, c in chunks.items()}, input_shape=shape)

    def calibrate_features(self, logits: Tensor, feats: dict[str, Tensor]) -> FusedDetector:
        """:meth:`set_calibration` from the captured outputs of all the held-out images at once.

        Parameters
        ----------
        logits : Tensor of shape (n, K)
        feats : dict of str to Tensor
            The output of every layer in ``layers``, e.g. {layer: (n, C, H, W)}.
        """
        scores = self.members_scores_features(logits, feats)
        return self.set_calibration({name: s.cpu() for name, s in scores.items()})

    def set_calibration(
        self, scores: Mapping[str, Tensor], *, input_shape: tuple[int, int, int] | None = None
    ) -> FusedDetector:
        """Install each member's calibration scores (held-out in-distribution images) and derive the tails.

        Parameters
        ----------
        scores : mapping of str to Tensor of shape (n,)
            One entry per member: its finite scores of n >= 2 held-out images (e.g. a benchmark's
            own scores, or ``calibration_`` of a saved detector). n may differ between members.
        input_shape : tuple (C, H, W), optional
            The images' shape; must match the members' fit shape where they recorded one.

        Returns
        -------
        FusedDetector
            ``self``.
        """
        names = list(self.members)
        if set(scores) != set(names):
            raise ValueError(
                f"scores must have one entry per member {names}; missing {sorted(set(names) - set(scores))}, "
                f"unexpected {sorted(set(scores) - set(names))}"
            )
        calibration, scales = {}, {}
        for name in names:
            s = scores[name]
            if not isinstance(s, Tensor) or s.ndim != 1 or s.numel() < 2:
                shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"calibration scores of member {name!r} must be a 1-D tensor of n >= 2 scores; got {shape}")
            bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"calibration scores of member {name!r} are not finite at {len(bad)} of {s.numel()} images "
                    f"(positions {bad[:10]}); calibration needs finite in-distribution images"
                )
            calibration[name] = s.detach().to("cpu", torch.float64).sort().values  # (n,)
            if s.numel() - 1 < self.tail_size:
                warnings.warn(
                    f"member {name!r} has {s.numel()} calibration scores: its tail is fitted on "
                    f"{s.numel() - 1} < tail_size={self.tail_size} exceedances",
                    UserWarning,
                    stacklevel=2,
                )
            scales[name] = pvalues.tail_scale(calibration[name], self.tail_size)
        if input_shape is not None:
            input_shape = tuple(int(v) for v in input_shape)
            odd = sorted(n for n, d in self.members.items() if d.input_shape_ not in (None, input_shape))
            if odd:
                raise ValueError(f"calibration images have shape {input_shape}; members {odd} were fitted on another shape")
        self.input_shape_ = input_shape or _common_input_shape(self.members)
        self.calibration_, self.tail_scales_ = calibration, scales
        self.fitted_ = True
        return self

    def partial_fit(self, logits: Tensor, feats: dict[str, Tensor], y: Tensor | None = None) -> Detector:
        """Not supported: fit the members (:func:`fit_detectors`), then :meth:`calibrate_features`."""
        raise NotImplementedError(_NO_PARTIAL_FIT)

    def finish_fit(self, *, input_shape: tuple[int, int, int] | None = None) -> Detector:
        """Not supported (see :meth:`partial_fit`)."""
        raise NotImplementedError(_NO_PARTIAL_FIT)

    # ---- scoring ---------------------------------------------------------------------------------

    def members_scores_features(self, logits: Tensor, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each member's raw score from shared outputs: {member: (N,)} (members fitted; no calibration needed).

        Parameters
        ----------
        logits : Tensor of shape (N, K)
        feats : dict of str to Tensor
            The output of every layer in ``layers``.
        """
        missing = [layer for layer in self.layers if layer not in feats]
        if missing:
            raise ValueError(f"feats must hold the output of every layer in {list(self.layers)}; missing {missing}")
        out = {}
        for name, det in self.members.items():
            if not det.is_fitted:
                raise ValueError(f"member {name!r} ({type(det).__name__}) is not fitted; call fit(loader, calibration=...)")
            out[name] = det.score_features(logits, {layer: feats[layer] for layer in det.layers})
        return out

    def log_p_values(self, member_scores: Mapping[str, Tensor]) -> Tensor:
        """log p-value of each member's score, (N, M) float64, columns in member order; -inf where
        a score is not finite (warned, naming the member)."""
        check_is_fitted(self)
        missing = [name for name in self.members if name not in member_scores]
        if missing:
            raise ValueError(f"member_scores must hold the scores of every member; missing {missing}")
        cols = []
        for name in self.members:
            s = member_scores[name]
            bad = int((~torch.isfinite(s)).sum())
            if bad:
                warnings.warn(
                    f"member {name!r} gave non-finite scores to {bad} of {s.numel()} inputs: p = 0, they are flagged",
                    RuntimeWarning,
                    stacklevel=3,
                )
            cols.append(pvalues.log_p_values(s, self.calibration_[name], self.tail_scales_[name]))
        return torch.stack(cols, dim=1)  # (N, M)

    def combine(self, member_scores: Mapping[str, Tensor]) -> Tensor:
        """The rule's score (N,) from members' raw scores {member: (N,)}, in the model's dtype;
        finite values saturate at the dtype's largest, a failed member gives +inf."""
        fused = pvalues.RULES[self.rule](self.log_p_values(member_scores))  # (N,) float64
        return saturate(fused, torch.isfinite(fused), model_dtype(self.model))

    def score_features(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Fused score (N,) from logits (N, K) and the outputs {layer: (N, C, H, W)} of ``layers``."""
        check_is_fitted(self)
        return self.combine(self.members_scores_features(logits, feats))

    @torch.no_grad()
    def members_scores(self, x: Tensor) -> dict[str, Tensor]:
        """Each member's raw score of images (N, C, H, W), one forward pass: {member: (N,)}."""
        return self.members_scores_features(*self.forward(x))


def _check_members(members: Mapping[str, Detector]) -> dict[str, Detector]:
    """Validate the members: named detectors of one model object, sharing one forward pass."""
    if not isinstance(members, Mapping) or not members:
        raise ValueError(f"members must be a non-empty dict of name -> Detector; got {members!r}")
    members = dict(members)
    for name, det in members.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"member names must be non-empty strings; got {name!r}")
        if not isinstance(det, Detector):
            raise TypeError(f"member {name!r} must be a covguard Detector; got {type(det).__name__}")
    counts = Counter(id(det.model) for det in members.values())
    first = id(next(iter(members.values())).model)
    model_id = max(counts, key=lambda i: (counts[i], i == first))  # the most common model; ties: the first member's
    odd = [name for name, det in members.items() if id(det.model) != model_id]
    if odd:
        others = [name for name in members if name not in odd]
        raise ValueError(f"members must all wrap the same model object; {odd} wrap another model than {others}")
    own_score = [name for name, det in members.items() if type(det).score is not Detector.score]
    if own_score:
        raise ValueError(
            f"members {own_score} override score (ODIN perturbs its input), so they cannot share one forward pass; "
            "score them on their own and combine p-values with covguard.pvalues"
        )
    stale = {name: det.model_sha256_ for name, det in members.items() if getattr(det, "model_sha256_", None)}
    if stale:
        current = parameter_sha256(next(iter(members.values())).model)
        changed = sorted(name for name, sha in stale.items() if sha != current)
        if changed:
            raise ValueError(
                f"members {changed} were fitted on other weights of the model (its parameters changed since); refit them"
            )
    return members


def _common_input_shape(members: dict[str, Detector]) -> tuple[int, int, int] | None:
    """The fit input shape the fitted members recorded; refuse members fitted on different shapes."""
    shapes = {name: det.input_shape_ for name, det in members.items() if det.input_shape_ is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"members were fitted on images of different shapes: {shapes}")
    return next(iter(shapes.values()), None)
