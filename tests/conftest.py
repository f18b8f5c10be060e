"""Shared fixtures: a tiny seeded CNN and synthetic image data."""

import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv stages (maps 8x8 and 4x4) and a linear head, for fast detector tests."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.block2(self.block1(x))).flatten(1))


def make_images(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent smooth blobs in [0, 1]: (n, 1, 8, 8) images and (n,) labels in 0..2."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    grid = torch.linspace(-1, 1, 8)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centers = torch.tensor([[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])[y]  # (n, 2)
    blob = torch.exp(-((xx - centers[:, 0, None, None]) ** 2 + (yy - centers[:, 1, None, None]) ** 2) / 0.2)
    x = 0.7 * blob[:, None] + 0.15 * torch.rand(n, 1, 8, 8, generator=gen) + shift
    return x.clamp(0, 1), y


@pytest.fixture(scope="session")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = make_images(300, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def images():
    return make_images(240, seed=1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: on a busy 2-core machine, OpenMP threads
    spinning against each other make small forward passes 50x slower (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
