"""Image classifiers that take ``[0, 1]`` inputs and expose their feature taps.

Every model normalizes its input in a first submodule ``normalize`` (non-persistent buffers, so
checkpoint keys are those of the original networks), ends with ``avgpool`` (output
``(N, C, 1, 1)``), flatten and a linear classifier, returns logits ``(N, K)``, and lists the
names of its natural feature taps in ``model.feature_layers``.
"""

import inspect
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
    "build_model",
    "check_device",
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


def check_device(device: str | torch.device) -> torch.device:
    """A usable torch device from a ``--device`` value, or a ValueError saying why not.

    Refuses names torch does not parse (``bogus``), the ``meta`` device (no data), and
    devices this machine does not have (``cuda`` without a GPU, ``cuda:3`` with two).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {err}") from None
    if dev.type == "meta":
        raise ValueError("--device meta holds no data and cannot run a model; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA GPU is available on this machine (torch {torch.__version__})")
    try:
        torch.empty(1, device=dev)
    except Exception as err:  # noqa: BLE001 (torch raises RuntimeError, AssertionError, ... per backend)
        raise ValueError(f"--device {device!r} cannot be used here: {type(err).__name__}: {err}") from None
    return dev


def build_model(name: str, model_args: Sequence[str] = ()) -> nn.Module:
    """A model of :data:`MODELS` from ``KEY=VALUE`` arguments; ValueError naming a bad name or argument."""
    if name not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}; got {name!r}")
    kwargs = parse_model_args(model_args)
    constructor = MODELS[name]
    try:
        inspect.signature(constructor).bind(**kwargs)
    except TypeError as err:
        accepted = [p for p in inspect.signature(constructor).parameters if p != "self"]
        raise ValueError(f"--model-arg: {name} does not accept {sorted(kwargs)} ({err}); its arguments: {accepted}") from None
    try:
        return constructor(**kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"--model-arg: {name}({kwargs}) cannot be built: {type(err).__name__}: {err}") from None


def load_model(name: str, weights: str | Path, *, model_args: Sequence[str] = (), device: str | torch.device = "cpu") -> nn.Module:
    """A model of :data:`MODELS` built with ``KEY=VALUE`` arguments, its checkpoint loaded, in eval mode on ``device``.

    Raises
    ------
    FileNotFoundError
        ``weights`` is not a file.
    ValueError
        An unknown model name or constructor argument, an unreadable or mismatched checkpoint,
        or an unusable device; each message names the option.
    """
    dev = check_device(device)
    model = load_checkpoint(build_model(name, model_args), weights)
    try:
        return model.to(dev).eval()
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"--device {device!r}: cannot move the model there: {err}") from None
