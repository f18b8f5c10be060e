"""Settings of the suite (:mod:`covguard.bench.suite`) and the choices fixed before it was scored.

Fixed in advance, never chosen from the suite's test results:

- :data:`FUSED_MEMBERS`: the members of each fused detector. ``fused_ours_knn_mds`` joins our
  class detector (best of the single detectors on FGSM and the adversarial mix in
  ``results/adversarial``), KNN (best on near and far OOD in ``results/ood``) and MDS (best on
  the iterative attacks): one detector per kind of shift, by the earlier benchmarks' published
  results, not by this suite's. ``fused_all_feature`` takes every feature-space detector of the
  line-up (no logit-only score, no ODIN: ODIN perturbs its input and cannot share the forward).
- :data:`FUSION_RULES`: both rules of :mod:`covguard.pvalues` (Fisher, Sidak min-p), each
  reported; no weights.
- :data:`HEADLINE`: the fused detector the targets are read on, ``fused_ours_knn_mds`` with
  Fisher's rule (the default rule of :class:`~covguard.detectors.fused.FusedDetector`).
- :data:`TAIL_SIZE`: the exponential tail of the p-values, FusedDetector's default.
"""

from __future__ import annotations

from dataclasses import dataclass

from covguard.bench.common import CHECKPOINT_KINDS, CIFAR_MODELS
from covguard.covariance import COVARIANCE_FORMS
from covguard.detectors.baselines import BASELINES

__all__ = [
    "DERIVED", "FUSED_MEMBERS", "FUSION_RULES", "GROUPS", "HEADLINE", "OURS", "SHORTCUT", "SuiteConfig", "TAIL_SIZE", "fused_detectors",
]

#: Fused detector -> its members (names of single detectors of the line-up), fixed in advance.
FUSED_MEMBERS: dict[str, tuple[str, ...]] = {
    "fused_ours_knn_mds": ("class_mahalanobis_top1", "knn", "mds"),
    "fused_all_feature": (
        "simple_mahalanobis", "class_mahalanobis_top1", "class_penultimate_original", "mds", "rmds", "knn", "vim",
    ),
}
#: Rules combining the members' p-values (keys of covguard.pvalues.RULES).
FUSION_RULES = ("fisher", "minp")
#: The fused detector the suite's targets are read on.
HEADLINE = "fused_ours_knn_mds_fisher"
#: Our single detectors, shown first among the single ones (headline of the earlier benchmarks first).
OURS = (
    "class_mahalanobis_top1", "class_mahalanobis_mixture", "simple_mahalanobis", "class_penultimate_original",
    "simple_mahalanobis_gaussian_fusion", "class_mahalanobis_top1_gaussian_fusion",
)
#: Calibration scores fitting each member's exponential tail (FusedDetector's default).
TAIL_SIZE = 20
#: Category groups of the image sets, in table order (the attack categories follow the config).
GROUPS = {
    "cifar100": "near", "tin": "near", "mnist": "far", "mnist_jpeg": "far",
    "uniform_noise": "noise", "gaussian_noise": "noise", "blank": "blank",
}
#: Categories of the shortcut model (same recipe, its own checkpoint).
SHORTCUT = ("shortcut_moved", "shortcut_removed")
_LINF = ("fgsm", "bim", "pgd", "igm")


def fused_detectors() -> dict[str, tuple[tuple[str, ...], str]]:
    """Fused detector name -> (members, rule), one per member set and rule: ``<members>_<rule>``."""
    return {f"{name}_{rule}": (members, rule) for name, members in FUSED_MEMBERS.items() for rule in FUSION_RULES}


#: Single detectors derived from the fitted ones by ``refit`` (no pass over the fit data), fixed in
#: advance: the two-sided Gaussian layer fusion, which also flags inputs too typical in some layers
#: (blank frames), next to the default sum of z-scores.
DERIVED: dict[str, tuple[str, dict]] = {
    "simple_mahalanobis_gaussian_fusion": ("simple_mahalanobis", {"fusion": "gaussian"}),
    "class_mahalanobis_top1_gaussian_fusion": ("class_mahalanobis_top1", {"fusion": "gaussian"}),
}


@dataclass(frozen=True)
class SuiteConfig:
    """Settings of ``covguard bench suite``; the defaults are the documented full run."""

    models: tuple[str, ...] = CIFAR_MODELS
    checkpoints: str = "original"  # "original" shared weights, or "finetuned" on the JPEG training set
    n_images: int = 1000  # CIFAR-10 test images drawn (seeded) = images per OOD, noise and blank set
    n_holdout: int = 5000  # training images held out from fit to standardize layer scores
    n_calibration: int = 2000  # training images held out from fit and holdout: the fused p-values' calibration
    max_train: int | None = None  # cap on fit images (reduced runs); None = all the rest
    covariance: str = "full"  # patch covariance form of our detectors
    mixture: bool = False  # also score class_mahalanobis_mixture (3x the top-1 scoring cost)
    derived: tuple[str, ...] = tuple(DERIVED)  # rows derived from fitted detectors by refit (see DERIVED)
    baselines: tuple[str, ...] = ("msp", "max_logit", "energy", "odin", "gen", "mds", "rmds", "knn", "vim", "react")
    attacks: tuple[str, ...] = ("fgsm", "bim", "pgd", "pgd_l2", "igm")  # at eps (pgd_l2 at eps_l2)
    eps: float = 8 / 255  # L-inf budget (pixels in [0, 1])
    small_eps: float = 2 / 255  # the second, smaller L-inf budget
    small_eps_attacks: tuple[str, ...] = ("fgsm", "pgd")  # attacked again at small_eps
    eps_l2: float = 0.5  # L2 budget of pgd_l2
    steps: int = 10  # PGD / PGD-L2 / IGM iterations (BIM: Kurakin's rule); step 2.5 eps / steps
    igm_scales: int = 8  # IGM: input scales averaged per integrated gradient
    shortcut: bool = False  # also fine-tune the shortcut model (bench shortcut's CIFAR-10 recipe) and score it
    shortcut_model: str = "resnet20"  # checkpoint the shortcut recipe fine-tunes
    shortcut_max_finetune: int | None = None  # cap on its fine-tuning images; None = the recipe's (all but the holdout)
    shortcut_max_test: int | None = None  # cap on its test images (seeded); None = all 10,000, as bench shortcut
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"
    timing_images: int = 256  # ID test images per timed scoring call (fused vs its costliest member)
    timing_repeats: int = 5  # interleaved repeats; medians
    cache: bool = True  # read and write the cache of scores and attacks
    cache_dir: str | None = None  # None: $COVGUARD_CACHE/suite or ~/.cache/covguard/suite
    progress: bool = True

    def attack_categories(self) -> dict[str, tuple[str, float]]:
        """Attack category -> (attack, budget): ``fgsm_8``, ..., ``pgd_l2_0.5``, ``fgsm_2``, ``pgd_2``."""
        out = {}
        for name in self.attacks:
            if name == "pgd_l2":
                out[f"pgd_l2_{self.eps_l2:g}"] = (name, self.eps_l2)
            else:
                out[f"{name}_{self.eps * 255:g}"] = (name, self.eps)
        for name in self.small_eps_attacks:
            out.setdefault(f"{name}_{self.small_eps * 255:g}", (name, self.small_eps))
        return out

    def categories(self) -> dict[str, str]:
        """Every category scored -> its group (near, far, noise, blank, adversarial, shortcut), in table order."""
        out = dict(GROUPS)
        out.update(dict.fromkeys(self.attack_categories(), "adversarial"))
        if self.shortcut:
            out.update(dict.fromkeys(SHORTCUT, "shortcut"))
        return out

    def fit_settings(self) -> dict:
        """The settings the fitted detectors (hence their scores) depend on: part of every score key."""
        return {
            "n_holdout": self.n_holdout, "n_calibration": self.n_calibration, "max_train": self.max_train,
            "covariance": self.covariance, "mixture": self.mixture, "baselines": list(self.baselines), "seed": self.seed,
            "derived": list(self.derived),
        }

    def check(self) -> None:
        """Refuse settings the suite cannot run, naming the field."""
        if unknown := [m for m in self.models if m not in CIFAR_MODELS]:
            raise ValueError(f"models must be among {CIFAR_MODELS}; got {unknown}")
        if self.checkpoints not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoints must be one of {CHECKPOINT_KINDS}; got {self.checkpoints!r}")
        if self.covariance not in COVARIANCE_FORMS:
            raise ValueError(f"covariance must be one of {COVARIANCE_FORMS}; got {self.covariance!r}")
        if unknown := [b for b in self.baselines if b not in BASELINES]:
            raise ValueError(f"baselines {unknown} are unknown; choose from {sorted(BASELINES)}")
        if unknown := [a for a in self.attacks if a not in (*_LINF, "pgd_l2")]:
            raise ValueError(f"attacks must be among fgsm, bim, pgd, pgd_l2, igm; got {unknown}")
        if unknown := [a for a in self.small_eps_attacks if a not in _LINF]:
            raise ValueError(f"small_eps_attacks must be L-inf attacks (fgsm, bim, pgd, igm); got {unknown}")
        for name in ("eps", "small_eps", "eps_l2"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("n_images", "steps", "igm_scales", "batch_size", "timing_images", "timing_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("n_holdout", "n_calibration"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2; got {getattr(self, name)}")
        lineup = {"simple_mahalanobis", "class_mahalanobis_top1", "class_penultimate_original", *self.baselines}
        for fused, members in FUSED_MEMBERS.items():
            if missing := [m for m in members if m not in lineup]:
                raise ValueError(f"baselines must include {missing}: members of {fused} (FUSED_MEMBERS)")
        if self.shortcut_model not in CIFAR_MODELS:
            raise ValueError(f"shortcut_model must be one of {CIFAR_MODELS}; got {self.shortcut_model!r}")
