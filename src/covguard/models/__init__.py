"""Image classifiers that take ``[0, 1]`` inputs and expose their feature taps.

Every model normalizes its input in a first submodule ``normalize`` (non-persistent buffers, so
checkpoint keys are those of the original networks), ends with ``avgpool`` (output
``(N, C, 1, 1)``), flatten and a linear classifier, returns logits ``(N, K)``, and lists the
names of its natural feature taps in ``model.feature_layers``.
"""

from collections.abc import Callable

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
