"""Detectors: fit on in-distribution data, score new inputs (larger = more anomalous)."""

from covguard.detectors.base import Detector, NotFittedError, check_is_fitted
from covguard.detectors.class_mahalanobis import ClassMahalanobis
from covguard.detectors.patch import PatchMahalanobis
from covguard.detectors.simple_mahalanobis import SimpleMahalanobis

__all__ = ["Detector", "NotFittedError", "check_is_fitted", "PatchMahalanobis", "SimpleMahalanobis", "ClassMahalanobis", "DETECTORS"]

#: Registry: name -> detector class (used by persistence and the CLI).
DETECTORS: dict[str, type[Detector]] = {
    "simple_mahalanobis": SimpleMahalanobis,
    "class_mahalanobis": ClassMahalanobis,
}
