"""covguard: patch-level Mahalanobis detectors for PyTorch image classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("covguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
