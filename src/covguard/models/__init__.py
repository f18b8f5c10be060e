"""Image classifiers that take ``[0, 1]`` inputs and expose their feature taps.

Every model normalizes its input in a first submodule ``normalize`` (non-persistent buffers, so
checkpoint keys are those of the original networks), ends with ``avgpool`` (output
``(N, C, 1, 1)``), flatten and a linear classifier, returns logits ``(N, K)``, and lists the
names of its natural feature taps in ``model.feature_layers``.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from covguard.models.checkpoints import cifar_resnet, load_checkpoint
from covguard.models.normalize import Normalize
from covguard.models.resnet18 import ResNet18CIFAR, resnet18_32x32
from covguard.models.resnet_cifar import ResNetCIFAR, resnet20, resnet32, resnet44
from covguard.models.small_cnn import SmallCNN

__all__ = [
    "MODELS",
    "Normalize",
    "ResNet18CIFAR",
    "ResNetCIFAR",
    "SmallCNN",
    "cifar_resnet",
    "load_checkpoint",
    "load_model",
    "parse_model_args",
    "resnet18_32x32",
    "resnet20",
    "resnet32",
    "resnet44",
]

# Name -> constructor; every constructor takes keyword arguments only.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet18_32x32": resnet18_32x32,
}


def parse_model_args(pairs: Sequence[str]) -> dict[str, object]:
    """``["num_classes=10", "width=8"]`` -> ``{"num_classes": 10, "width": 8}`` (values parsed as JSON, else strings)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg must be KEY=VALUE; got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_model(name: str, weights: str | Path, *, model_args: Sequence[str] = (), device: str | torch.device = "cpu") -> nn.Module:
    """A model of :data:`MODELS` built with ``KEY=VALUE`` arguments, its checkpoint loaded, in eval mode on ``device``."""
    if name not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}; got {name!r}")
    return load_checkpoint(MODELS[name](**parse_model_args(model_args)), weights).to(device).eval()
