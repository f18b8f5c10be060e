"""CIFAR-10 ResNet-20/32/44 of He et al. (2016) with option-A (parameter-free) shortcuts.

The modules and their names follow Yerlan Idelbayev's ``akamaster/pytorch_resnet_cifar10``
(BSD-2-Clause), so its pretrained checkpoints load with strict key matching: ``conv1``, ``bn1``,
``layer1`` .. ``layer3`` of :class:`BasicBlock` (``conv1``, ``bn1``, ``conv2``, ``bn2``,
``shortcut``) and ``linear``. Two additions hold no state: ``normalize`` in front (inputs are in
``[0, 1]``) and a named ``avgpool`` module in place of the functional pooling, so the pooled
features can be captured with a forward hook.

Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, arXiv:1512.03385, section 4.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from covguard.models.normalize import Normalize

__all__ = [
    "CIFAR_RESNET_MEAN",
    "CIFAR_RESNET_STD",
    "BasicBlock",
    "OptionAShortcut",
    "ResNetCIFAR",
    "resnet20",
    "resnet32",
    "resnet44",
]

# Normalization the akamaster checkpoints were trained with (the ImageNet statistics).
CIFAR_RESNET_MEAN = (0.485, 0.456, 0.406)
CIFAR_RESNET_STD = (0.229, 0.224, 0.225)


class OptionAShortcut(nn.Module):
    """Parameter-free projection shortcut: spatial subsampling and zero channel padding.

    Equivalent to akamaster's ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``
    for ``stride=2`` and ``out_channels = 2 * in_channels``.

    Parameters
    ----------
    in_channels : int
        Channels ``C_in`` of the input.
    out_channels : int
        Channels ``C_out >= C_in`` of the output; ``C_out - C_in`` zero channels are added, half
        before and half after the input channels.
    stride : int
        Subsampling step, keeping pixels ``0, stride, 2 stride, ...`` in each direction.

    Shape
    -----
    - Input: ``(N, C_in, H, W)``.
    - Output: ``(N, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"out_channels must be >= in_channels={in_channels}; got {out_channels}"
            )
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        """Subsample and zero-pad ``x`` of shape ``(N, C_in, H, W)`` to ``(N, C_out, H', W')``."""
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C_in, H', W')
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))  # (N, C_out, H', W')

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Parameters
    ----------
    in_channels : int
        Channels ``C_in`` of the input.
    out_channels : int
        Channels ``C_out`` of the output.
    stride : int
        Stride of ``conv1``.
    shortcut : nn.Module
        Maps the input ``(N, C_in, H, W)`` to the output's shape ``(N, C_out, H', W')``:
        ``nn.Identity()`` when the shapes agree, otherwise a projection
        (:class:`OptionAShortcut`, or conv1x1 + BatchNorm in ResNet-18).

    Shape
    -----
    - Input: ``(N, C_in, H, W)``.
    - Output: ``(N, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape ``(N, C_in, H, W)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not in place: a hook on bn2 must keep seeing bn2's own output.
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet of depth ``6 n + 2``: a 3x3 stem and three stages of ``n`` basic blocks.

    The stages have 16, 32 and 64 channels; the first block of stages 2 and 3 has stride 2 and an
    option-A shortcut (no parameters). Weights are initialized as in akamaster's training code
    (Kaiming-normal convolutions and linear layer).

    Parameters
    ----------
    depth : int, default=20
        Number of weighted layers, ``6 n + 2`` with ``n >= 1``: 20, 32, 44, 56, 110, ...
    num_classes : int, default=10
        Number of classes ``K``.
    mean, std : sequence of float, default=CIFAR_RESNET_MEAN, CIFAR_RESNET_STD
        Normalization applied by the first submodule ``normalize``, three values each. The
        defaults are those the akamaster checkpoints were trained with.

    Raises
    ------
    ValueError
        If ``depth`` is not of the form ``6 n + 2`` or ``num_classes`` is not a positive integer.

    Attributes
    ----------
    feature_layers : tuple of str
        ``("layer1", "layer2", "layer3", "avgpool")``; for a 32x32 input their outputs have
        shapes ``(N, 16, 32, 32)``, ``(N, 32, 16, 16)``, ``(N, 64, 8, 8)`` and
        ``(N, 64, 1, 1)``.

    Shape
    -----
    - Input: ``(N, 3, 32, 32)`` float32 images in ``[0, 1]``.
    - Output: ``(N, K)`` logits.

    Examples
    --------
    >>> import torch
    >>> model = ResNetCIFAR(depth=20).eval()
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    feature_layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "avgpool")

    def __init__(
        self,
        *,
        depth: int = 20,
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR_RESNET_MEAN,
        std: Sequence[float] = CIFAR_RESNET_STD,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or depth % 6 != 2:
            raise ValueError(f"depth must be 6 n + 2 with n >= 1 (20, 32, 44, ...); got {depth!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        blocks_per_stage = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = _make_stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = _make_stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch of images.

        Parameters
        ----------
        x : Tensor of shape (N, 3, H, W)
            Images in ``[0, 1]``, 32x32 for the pretrained weights.

        Returns
        -------
        Tensor of shape (N, K)
            Logits.
        """
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))  # (N, 16, H, W)
        out = self.layer3(self.layer2(self.layer1(out)))  # (N, 64, H/4, W/4)
        out = self.avgpool(out)  # (N, 64, 1, 1)
        return self.linear(out.flatten(1))  # (N, 64) -> (N, K)


def _make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = []
    for index in range(num_blocks):
        block_in = in_channels if index == 0 else out_channels
        block_stride = stride if index == 0 else 1
        if block_stride != 1 or block_in != out_channels:
            shortcut: nn.Module = OptionAShortcut(block_in, out_channels, block_stride)
        else:
            shortcut = nn.Identity()
        blocks.append(BasicBlock(block_in, out_channels, block_stride, shortcut))
    return nn.Sequential(*blocks)


def resnet20(*, num_classes: int = 10) -> ResNetCIFAR:
    """ResNet-20 (3 blocks per stage, 0.27M parameters), keys of ``resnet20-12fca82f.th``."""
    return ResNetCIFAR(depth=20, num_classes=num_classes)


def resnet32(*, num_classes: int = 10) -> ResNetCIFAR:
    """ResNet-32 (5 blocks per stage, 0.46M parameters), keys of ``resnet32-d509ac18.th``."""
    return ResNetCIFAR(depth=32, num_classes=num_classes)


def resnet44(*, num_classes: int = 10) -> ResNetCIFAR:
    """ResNet-44 (7 blocks per stage, 0.66M parameters), keys of ``resnet44-014dd654.th``."""
    return ResNetCIFAR(depth=44, num_classes=num_classes)
