"""ResNet-18 for 32x32 inputs, state-dict compatible with OpenOOD's ``ResNet18_32x32``.

Module names follow ``openood/networks/resnet18_32x32.py`` (OpenOOD v1.5), so OpenOOD's CIFAR-10
checkpoints load with strict key matching: a 3x3 stride-1 stem (``conv1``, ``bn1``, no max-pool),
``layer1`` .. ``layer4`` of two basic blocks each, whose downsampling blocks hold a ``shortcut``
``nn.Sequential`` of conv1x1 + BatchNorm (keys ``shortcut.0.*``, ``shortcut.1.*``), ``avgpool``
and ``fc``. The only addition, ``normalize`` in front, holds no state: OpenOOD normalizes in its
data pipeline, covguard inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from covguard.models.normalize import Normalize
from covguard.models.resnet_cifar import BasicBlock

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "ResNet18CIFAR", "resnet18_32x32"]

# CIFAR-10 training-set statistics, as in OpenOOD's preprocessing.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class ResNet18CIFAR(nn.Module):
    """ResNet-18 with a CIFAR stem: four stages of 64, 128, 256 and 512 channels.

    Parameters
    ----------
    num_classes : int, default=10
        Number of classes ``K``.
    mean, std : sequence of float, default=CIFAR10_MEAN, CIFAR10_STD
        Normalization applied by the first submodule ``normalize``, three values each.

    Raises
    ------
    ValueError
        If ``num_classes`` is not a positive integer.

    Attributes
    ----------
    feature_layers : tuple of str
        ``("layer1", "layer2", "layer3", "layer4", "avgpool")``; for a 32x32 input their
        outputs have shapes ``(N, 64, 32, 32)``, ``(N, 128, 16, 16)``, ``(N, 256, 8, 8)``,
        ``(N, 512, 4, 4)`` and ``(N, 512, 1, 1)``.

    Shape
    -----
    - Input: ``(N, 3, 32, 32)`` float32 images in ``[0, 1]``.
    - Output: ``(N, K)`` logits.

    Examples
    --------
    >>> import torch
    >>> model = ResNet18CIFAR().eval()
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    feature_layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4", "avgpool")

    def __init__(
        self,
        *,
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _make_stage(64, 64, stride=1)
        self.layer2 = _make_stage(64, 128, stride=2)
        self.layer3 = _make_stage(128, 256, stride=2)
        self.layer4 = _make_stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch of images.

        Parameters
        ----------
        x : Tensor of shape (N, 3, H, W)
            Images in ``[0, 1]``, 32x32 for OpenOOD's CIFAR-10 weights.

        Returns
        -------
        Tensor of shape (N, K)
            Logits.
        """
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))  # (N, 64, H, W)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (N, 512, H/8, W/8)
        out = self.avgpool(out)  # (N, 512, 1, 1)
        return self.fc(out.flatten(1))  # (N, 512) -> (N, K)


def _make_stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    if stride != 1 or in_channels != out_channels:
        shortcut: nn.Module = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    else:
        shortcut = nn.Identity()
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride, shortcut),
        BasicBlock(out_channels, out_channels, 1, nn.Identity()),
    )


def resnet18_32x32(
    *,
    num_classes: int = 10,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> ResNet18CIFAR:
    """ResNet-18 for 32x32 inputs (11.17M parameters at ``K=10``), OpenOOD's key layout.

    Parameters
    ----------
    num_classes : int, default=10
        Number of classes ``K``.
    mean, std : sequence of float, default=CIFAR10_MEAN, CIFAR10_STD
        Input normalization, three values each.

    Returns
    -------
    ResNet18CIFAR
        A randomly initialized model (PyTorch default initialization, as OpenOOD).
    """
    return ResNet18CIFAR(num_classes=num_classes, mean=mean, std=std)
