"""Fine-tune the shared CIFAR-10 ResNets on the JPEG copy of the training set (``covguard finetune``).

The shared checkpoints were trained on lossless CIFAR-10 and lose about 10 points on the JPEG
copy the benchmarks use. This command fine-tunes the whole network on the 50,000 JPEG training
images (random crop with 4-pixel padding, horizontal flip, SGD with a cosine schedule), measures
the JPEG test accuracy before and after, and writes the weights as safetensors next to a JSON
log of the run. The benchmarks load them with ``--checkpoints finetuned``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

from covguard.files import atomic_writer
from covguard.bench.common import accuracy, load_cifar_model
from covguard.data.registry import load_set
from covguard.finetune import finetune

__all__ = ["FinetuneConfig", "finetune_checkpoint"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tuning run (recorded in its log)."""

    epochs: int = 3  # passes over the 50,000 training images
    lr: float = 0.01  # peak SGD learning rate, cosine-decayed to 0
    weight_decay: float = 5e-4
    batch_size: int = 128
    crop_padding: int = 4  # random crop of the zero-padded image
    seed: int = 0
    max_train: int | None = None  # first images of a seeded permutation (quick runs); None = all
    device: str = "cpu"
    progress: bool = True


def finetune_checkpoint(
    name: str, root: str | Path, out: str | Path, config: FinetuneConfig = FinetuneConfig(), *, force: bool = False
) -> dict:
    """Fine-tune the shared checkpoint ``name`` on the JPEG training set and save it to ``out``.

    Parameters
    ----------
    name : {"resnet20", "resnet32", "resnet44"}
    root : str or Path
        Benchmark data root (``models/``, ``cifar10-jpeg/``).
    out : str or Path
        Destination ``.safetensors``; the log goes to the same path with suffix ``.json``.
    config : FinetuneConfig
    force : bool
        Overwrite an existing ``out``; refused otherwise.

    Returns
    -------
    dict
        The log: settings, per-epoch losses, JPEG test accuracy before and after, seconds.

    Raises
    ------
    FileExistsError
        If ``out`` exists and ``force`` is False.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out must end in .safetensors; got {str(out)!r}")
    if out.exists() and not force:
        raise FileExistsError(f"out {str(out)!r} exists; pass --force to overwrite it")
    root = Path(root)
    train = load_set("cifar10_train", root, progress=config.progress)
    test = load_set("cifar10_test", root, progress=config.progress)
    model = load_cifar_model(root, name, config.device)
    images, labels = train.images, train.labels
    if config.max_train is not None:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[: config.max_train]
        images, labels = images[keep], labels[keep]
    before = accuracy(model, test.float(), test.labels)
    tic = time.perf_counter()
    losses = finetune(
        model, images, labels, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
        batch_size=config.batch_size, seed=config.seed, crop_padding=config.crop_padding, progress=config.progress,
    )
    seconds = time.perf_counter() - tic
    after = accuracy(model, test.float(), test.labels)
    log = {
        "model": name,
        "source": "shared pretrained checkpoint (lossless CIFAR-10)",
        "config": asdict(config),
        "n_train": len(images),
        "losses": losses,
        "jpeg_test_accuracy_before": before,
        "jpeg_test_accuracy_after": after,
        "train_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out) as handle:
        handle.write(save_bytes(state, metadata={"model": name, "jpeg_test_accuracy": f"{after:.4f}"}))
    with atomic_writer(out.with_suffix(".json"), "w") as handle:
        handle.write(json.dumps(log, indent=2) + "\n")
    return log
