"""covguard: patch-level Mahalanobis detectors for PyTorch image classifiers.

Examples
--------
>>> import covguard as cg
>>> det = cg.ClassMahalanobis(model, layers=["layer1", "layer2"])   # doctest: +SKIP
>>> det.fit(train_loader)                                           # doctest: +SKIP
>>> scores = det.score(x)                # (N,), larger = more anomalous  # doctest: +SKIP
>>> cg.save(det, "guard.safetensors"); det = cg.load("guard.safetensors", model)  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("covguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

from covguard.detectors import DETECTORS, ClassMahalanobis, Detector, NotFittedError, SimpleMahalanobis  # noqa: E402
from covguard.features import FeatureTap  # noqa: E402
from covguard.persistence import load, save  # noqa: E402

__all__ = [
    "__version__",
    "DETECTORS",
    "ClassMahalanobis",
    "Detector",
    "FeatureTap",
    "NotFittedError",
    "SimpleMahalanobis",
    "load",
    "save",
]
