"""What the shortcut benchmark runs on: marked training data and the model that learned the marker.

``dataset="digits"``: scikit-learn's digits, a SmallCNN trained from scratch on the marked
training split, the validation split (marked) held out. ``dataset="cifar10"``: the shared
CIFAR-10 JPEG copy, the shared ResNet with its last stage and classifier fine-tuned on the marked
training images, ``n_holdout`` marked training images held out of both the fine-tuning and the
detector fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from covguard.bench.shortcut_config import ShortcutConfig
from covguard.data.shortcut import MarkerSpec, ShortcutSet, resolve_classes, shortcut_set
from covguard.data.batches import ImageBatches
from covguard.finetune import finetune

__all__ = ["ShortcutSetup", "float_batches", "prepare"]


@dataclass
class ShortcutSetup:
    """The trained model and the data of one shortcut run."""

    model: nn.Module  # in eval mode, trained (digits) or fine-tuned (CIFAR-10) on the marked images
    names: list[str]  # all class names
    classes: tuple[int, ...]  # shortcut class indices
    marker: MarkerSpec
    train: ShortcutSet  # marked images the model was trained or fine-tuned on
    fit: ShortcutSet  # marked images the detectors are fitted on
    hold: ShortcutSet  # held-out marked images that standardize layer scores
    test: tuple[Tensor, Tensor]  # test images (N, C, H, W) and labels (N,), unmarked (seeded subset)
    losses: list[float]  # training or fine-tuning loss per epoch
    train_seconds: float
    n_finetune: int | None = None  # CIFAR-10: fine-tuning images


def prepare(cfg: ShortcutConfig) -> ShortcutSetup:
    """Mark the data and train the model, for a resolved config (:meth:`ShortcutConfig.resolved`).

    Raises
    ------
    ValueError
        For an unknown class (naming ``classes``), a marker larger than the images (naming
        ``marker``), a bad subset cap or ``n_holdout``.
    FileNotFoundError
        For ``dataset="cifar10"`` without the data.
    """
    return _prepare_digits(cfg) if cfg.dataset == "digits" else _prepare_cifar(cfg)


def _marker(cfg: ShortcutConfig) -> MarkerSpec:
    height, width = cfg.marker_size
    return MarkerSpec(height=int(height), width=int(width), position=cfg.position)


def _seeded_subset(n: int, limit: int | None, seed: int) -> Tensor:
    """All of ``range(n)`` or a seeded subset of ``limit`` indices (sorted)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise ValueError(f"a subset cap must be >= 1; got {limit}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def float_batches(data: ShortcutSet, batch_size: int) -> ImageBatches:
    """Re-iterable (x, y) batches of float32 [0, 1] images, converted one batch at a time."""
    return ImageBatches(data.images, data.labels, batch_size)


def _take(data: ShortcutSet, rows: Tensor) -> ShortcutSet:
    return ShortcutSet(data.images[rows], data.labels[rows], data.boxes[rows], data.index[rows])


def _prepare_digits(cfg: ShortcutConfig) -> ShortcutSetup:
    """Marked digits, a SmallCNN trained on them, and the test sets."""
    from covguard.data import load_digits_split
    from covguard.models import SmallCNN
    from covguard.train import train_classifier

    split = load_digits_split(size=cfg.size, seed=cfg.seed)
    names = list(split.classes)
    classes = resolve_classes(cfg.classes, names)
    marker = _marker(cfg)
    common = {"classes": classes, "marker": marker, "p_marked": cfg.p_marked, "p_other": cfg.p_other}
    train = shortcut_set(*split.train.tensors, seed=cfg.seed, **common)
    hold = shortcut_set(*split.val.tensors, seed=cfg.seed + 100, **common)
    x_test, y_test = split.test.tensors
    pick = _seeded_subset(len(y_test), cfg.max_test, cfg.seed)
    tic = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = SmallCNN(in_channels=1, num_classes=len(names))
    losses = train_classifier(
        model, TensorDataset(train.images, train.labels), epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed,
        device=cfg.device, progress=cfg.progress,
    )
    fit = train if cfg.max_train is None else _take(train, torch.arange(min(cfg.max_train, len(train))))
    return ShortcutSetup(
        model=model.eval(), names=names, classes=classes, marker=marker, train=train, fit=fit, hold=hold,
        test=(x_test[pick], y_test[pick]), losses=losses, train_seconds=time.perf_counter() - tic,
    )


def _prepare_cifar(cfg: ShortcutConfig) -> ShortcutSetup:
    """Marked CIFAR-10, the shared ResNet fine-tuned on it (last stage), and the test sets."""
    from covguard.bench.common import load_cifar_model
    from covguard.data.cifar import CIFAR10_CLASSES
    from covguard.data.registry import data_root, load_set

    resolve_classes(cfg.classes, CIFAR10_CLASSES)  # fail on bad arguments before loading anything
    _marker(cfg).check_fits(32, 32)
    root = Path(cfg.data) if cfg.data else data_root()
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"data must be the benchmark data folder (see data_root()); got {cfg.data!r}")
    train_set = load_set("cifar10_train", root, progress=cfg.progress)
    test_set = load_set("cifar10_test", root, progress=cfg.progress)
    names = list(train_set.classes)
    classes = resolve_classes(cfg.classes, names)
    marker = _marker(cfg)
    common = {"classes": classes, "marker": marker, "p_marked": cfg.p_marked, "p_other": cfg.p_other}
    marked = shortcut_set(train_set.images, train_set.labels, seed=cfg.seed, **common)
    if not 2 <= cfg.n_holdout < len(marked):
        raise ValueError(f"n_holdout must be in [2, {len(marked)}); got {cfg.n_holdout}")
    order = torch.randperm(len(marked), generator=torch.Generator().manual_seed(cfg.seed))
    hold_idx, rest = order[: cfg.n_holdout], order[cfg.n_holdout :]
    tune_idx = rest if cfg.max_finetune is None else rest[: cfg.max_finetune]
    fit_idx = rest if cfg.max_train is None else rest[: cfg.max_train]
    tic = time.perf_counter()
    model = load_cifar_model(root, cfg.model, cfg.device)
    losses = finetune(
        model, marked.images[tune_idx], marked.labels[tune_idx], trainable=("layer3", "linear"), epochs=cfg.epochs,
        lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
    )
    pick = _seeded_subset(len(test_set), cfg.max_test, cfg.seed)
    return ShortcutSetup(
        model=model, names=names, classes=classes, marker=marker,
        train=_take(marked, tune_idx), fit=_take(marked, fit_idx), hold=_take(marked, hold_idx),
        test=(test_set.images[pick], test_set.labels[pick]), losses=losses,
        train_seconds=time.perf_counter() - tic, n_finetune=len(tune_idx),
    )
