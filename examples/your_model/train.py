"""Train MyNet on a folder of ``<class>/<image>`` files and save its weights (the user's own training).

    python examples/your_model/train.py --train digits/train --out mynet.pt
"""

import argparse
import importlib.util
from pathlib import Path

import torch
from torch import nn

from covguard.data.training_images import read_training_images

HERE = Path(__file__).resolve().parent


def build_from_file(**kwargs) -> nn.Module:
    spec = importlib.util.spec_from_file_location("mynet", HERE / "mynet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(**kwargs)


def train(folder: str | Path, out: str | Path, *, epochs: int = 15, seed: int = 0) -> nn.Module:
    """Adam, batch 64, cross-entropy; the images are read as covguard fit and score read them."""
    data = read_training_images(folder, channels=1, labeled=True, progress=False)
    x, y = data.float(), data.labels  # (N, 1, 16, 16) in [0, 1], (N,)
    torch.manual_seed(seed)
    model = build_from_file(num_classes=len(data.classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        model.train()
        for rows in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
    model.eval()
    torch.save(model.state_dict(), out)
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="folder of <class>/<image> files")
    parser.add_argument("--out", required=True, help="weights file to write (.pt)")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    train(args.train, args.out, epochs=args.epochs)
