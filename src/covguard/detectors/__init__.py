"""Detectors: fit on in-distribution data, score new inputs (larger = more anomalous)."""

from covguard.detectors.base import Detector, NotFittedError, check_is_fitted
from covguard.detectors.baselines import BASELINES
from covguard.detectors.class_mahalanobis import ClassMahalanobis
from covguard.detectors.fused import FusedDetector
from covguard.detectors.patch import PatchMahalanobis
from covguard.detectors.simple_mahalanobis import SimpleMahalanobis

__all__ = [
    "BASELINES",
    "DETECTORS",
    "ClassMahalanobis",
    "Detector",
    "FusedDetector",
    "NotFittedError",
    "PatchMahalanobis",
    "SimpleMahalanobis",
    "check_is_fitted",
]

#: Registry: name -> detector class, the ``detector`` a saved file names (used by persistence and
#: the CLI): the two patch detectors, every baseline of :data:`BASELINES`, and ``"fused"``.
DETECTORS: dict[str, type[Detector]] = {
    "simple_mahalanobis": SimpleMahalanobis,
    "class_mahalanobis": ClassMahalanobis,
    **BASELINES,
    "fused": FusedDetector,
}
