"""covguard: patch-level Mahalanobis detectors for PyTorch image classifiers.

Examples
--------
>>> import covguard as cg
>>> det = cg.ClassMahalanobis(model, layers=["layer1", "layer2"])   # doctest: +SKIP
>>> det.fit(train_loader)                                           # doctest: +SKIP
>>> scores = det.score(x)                # (N,), larger = more anomalous  # doctest: +SKIP
>>> cg.save(det, "det.safetensors"); det = cg.load("det.safetensors", model)  # doctest: +SKIP
>>> guard = cg.Guard(model, det).calibrate(val_loader, tpr=0.95)   # doctest: +SKIP
>>> guard(x).flagged                     # (N,) bool: do not trust these predictions  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("covguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

from covguard.detectors import DETECTORS, ClassMahalanobis, Detector, NotFittedError, SimpleMahalanobis  # noqa: E402
from covguard.features import FeatureTap  # noqa: E402
from covguard.guard import Guard, GuardResult, load_guard  # noqa: E402
from covguard.persistence import load, save  # noqa: E402

__all__ = [
    "__version__",
    "DETECTORS",
    "ClassMahalanobis",
    "Detector",
    "FeatureTap",
    "Guard",
    "GuardResult",
    "NotFittedError",
    "SimpleMahalanobis",
    "load",
    "load_guard",
    "save",
]
