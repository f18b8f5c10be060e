"""A three-stage CNN for the embedded demo on scikit-learn digits upsampled to 16x16."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from covguard.models.normalize import Normalize

__all__ = ["SmallCNN"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class SmallCNN(nn.Module):
    """Three conv stages, global average pooling and a linear classifier.

    ``block1`` is conv3x3 + BatchNorm + ReLU at full resolution; ``block2`` and ``block3`` each
    start with a 2x2 max-pool, so on the demo's 16x16 digits the three stages produce 16x16, 8x8
    and 4x4 maps. About 24k parameters at ``width=16``; trains to > 95 % test accuracy on the
    digits in a few seconds on a CPU.

    Parameters
    ----------
    in_channels : int, default=1
        Channels of the input images.
    num_classes : int, default=10
        Number of classes ``K``.
    width : int, default=16
        Channels of ``block1``; ``block2`` and ``block3`` have ``2 * width`` and ``4 * width``.
    mean, std : sequence of float, default=(0.5,)
        Normalization applied by the first submodule ``normalize``: one value per input channel,
        or one value for all channels.

    Raises
    ------
    ValueError
        If ``in_channels``, ``num_classes`` or ``width`` is not a positive integer, or ``mean`` /
        ``std`` hold neither 1 nor ``in_channels`` values.

    Attributes
    ----------
    feature_layers : tuple of str
        ``("block1", "block2", "block3", "avgpool")``, names in ``named_modules()`` whose
        outputs are the natural feature taps, of shapes (for input ``(N, C, H, W)``, ``H`` and
        ``W`` divisible by 4): ``(N, width, H, W)``, ``(N, 2 width, H/2, W/2)``,
        ``(N, 4 width, H/4, W/4)`` and ``(N, 4 width, 1, 1)``.

    Shape
    -----
    - Input: ``(N, in_channels, H, W)``, float32 images in ``[0, 1]`` (16x16 in the demo).
    - Output: ``(N, K)`` logits.

    Examples
    --------
    >>> import torch
    >>> model = SmallCNN(width=8).eval()
    >>> model(torch.rand(2, 1, 16, 16)).shape
    torch.Size([2, 10])
    """

    feature_layers: tuple[str, ...] = ("block1", "block2", "block3", "avgpool")

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if len(mean) not in (1, in_channels):
            raise ValueError(
                f"mean and std must hold 1 or in_channels={in_channels} values; "
                f"got {len(mean)} values for mean"
            )
        self.normalize = Normalize(mean, std)
        self.block1 = nn.Sequential(*_conv_bn_relu(in_channels, width))
        self.block2 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(width, 2 * width))
        self.block3 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(2 * width, 4 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch of images.

        Parameters
        ----------
        x : Tensor of shape (N, in_channels, H, W)
            Images in ``[0, 1]``.

        Returns
        -------
        Tensor of shape (N, K)
            Logits.
        """
        out = self.normalize(x)
        out = self.block3(self.block2(self.block1(out)))  # (N, 4 width, H/4, W/4)
        out = self.avgpool(out)  # (N, 4 width, 1, 1)
        return self.fc(out.flatten(1))  # (N, 4 width) -> (N, K)
