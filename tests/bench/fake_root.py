"""A synthetic data root in the layout of ../shared/data, and a tiny net with the CIFAR ResNets' module names,
for end-to-end runs of the benchmarks without the real data."""

import gzip
import io
import struct
import tarfile

import numpy as np
import torch
from PIL import Image
from torch import nn

from covguard.data.cifar import CIFAR10_CLASSES

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [128, 128, 128]])


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    """An (H, W, 3) uint8 array encoded as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` to ``tar`` as the regular file ``name``."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _colour_images(rng, label: int, n: int, size: int = 32) -> list[np.ndarray]:
    base = PALETTE[label % len(PALETTE)]
    return [np.clip(base + rng.integers(-40, 41, size=(size, size, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _idx(array: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def build_root(root):
    """The layout of ../shared/data in miniature: 160 train / 100 test CIFAR-10 images (class colours),
    100 CIFAR-100 classes of 1, 25 Tiny ImageNet classes of 2 (64x64), 40 MNIST digits."""
    rng = np.random.default_rng(0)
    (root / "cifar10-jpeg").mkdir(parents=True)
    for split, n in (("train", 16), ("test", 10)):
        with tarfile.open(root / "cifar10-jpeg" / f"{split}.tar", "w") as tar:
            for k, cls in enumerate(CIFAR10_CLASSES):
                for i, a in enumerate(_colour_images(rng, k, n)):
                    add_member(tar, f"{split}/{cls}/{i:04d}.jpg", jpeg_bytes(a))
    with tarfile.open(root / "cifar100-jpeg.tar", "w") as tar:
        for k in range(100):
            add_member(tar, f"cifar100-jpeg/test/c{k:02d}/0000.jpg", jpeg_bytes(_colour_images(rng, k + 3, 1)[0]))
    wnids = [f"n{k:08d}" for k in range(25)]
    with tarfile.open(root / "tiny-imagenet-200-val.tar", "w") as tar:
        add_member(tar, "tiny-imagenet-200/wnids.txt", "\n".join(wnids).encode())
        lines = []
        for i in range(50):
            add_member(tar, f"tiny-imagenet-200/val/images/val_{i}.JPEG", jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
            lines.append(f"val_{i}.JPEG\t{wnids[i % 25]}\t0\t0\t63\t63")
        add_member(tar, "tiny-imagenet-200/val/val_annotations.txt", "\n".join(lines).encode())
    (root / "mnist").mkdir()
    digits = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    (root / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(digits, 0x08)))
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(40, dtype=np.uint8) % 10, 0x08)))
    return root


class TinyCifarNet(nn.Module):
    """The module names the benchmarks tap on the CIFAR ResNets (layer1-3, avgpool, linear), 8-12 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.avgpool(self.layer3(self.layer2(self.layer1(x)))).flatten(1))


def train_tiny_net(x: torch.Tensor, y: torch.Tensor, *, steps: int = 150, seed: int = 0) -> TinyCifarNet:
    """A :class:`TinyCifarNet` fitted to images (N, 3, 32, 32) in [0, 1] with labels (N,), in eval mode."""
    torch.manual_seed(seed)
    model = TinyCifarNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()
