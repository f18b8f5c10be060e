"""A user's own classifier: three conv stages on 16x16 grey images (the worked example of docs/your-model.md).

covguard builds it with ``--model-file examples/your_model/mynet.py:build`` (importing this file)
and loads the trained weights from ``--weights``.
"""

from torch import Tensor, nn


class MyNet(nn.Module):
    """Images (N, 1, 16, 16) in [0, 1] -> logits (N, num_classes); stages give 16x16, 8x8, 4x4 maps."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage3(self.stage2(self.stage1(x - 0.5))))  # (N, num_classes)


def build(num_classes: int = 10, width: int = 8) -> MyNet:
    """The factory covguard calls (``--model-arg num_classes=...`` become its keyword arguments)."""
    return MyNet(num_classes=num_classes, width=width)
