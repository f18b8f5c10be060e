"""A small supervised training loop and an accuracy check, enough for the embedded demo models."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sized

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = ["evaluate_accuracy", "train_classifier"]

logger = logging.getLogger(__name__)


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def _check_non_empty(dataset: Dataset, name: str) -> None:
    if not isinstance(dataset, Sized):
        raise ValueError(
            f"{name} must be a map-style dataset with a length; got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} must be non-empty; got a dataset of length 0")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def train_classifier(
    model: nn.Module,
    train_set: Dataset,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    augment: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[float]:
    """Train a classifier with cross-entropy, Adam and a cosine learning-rate schedule.

    The learning rate decays from ``lr`` to 0 along a cosine over all ``epochs * batches``
    steps (``torch.optim.lr_scheduler.CosineAnnealingLR``, stepped per batch). ``weight_decay``
    is Adam's L2 penalty. The model is in training mode during the loop and left in eval mode.

    Runs are reproducible for a given ``seed`` on CPU: the shuffle uses its own
    ``torch.Generator``, and the loop runs under ``torch.random.fork_rng`` seeded with ``seed``,
    so dropout and a random ``augment`` are seeded too while the caller's global random state
    is left as it was.

    Parameters
    ----------
    model : nn.Module
        Classifier mapping a batch ``x`` of shape (N, ...) to logits of shape (N, K); it sees
        the inputs as stored in ``train_set`` (models normalize internally). Trained in place.
    train_set : Dataset
        Map-style, non-empty, yields ``(x, y)`` with ``y`` an int64 class index in ``0..K-1``,
        e.g. a ``TensorDataset``.
    epochs : int, default=30
        Passes over ``train_set``, at least 1.
    batch_size : int, default=64
        Images per step, at least 1. The last, smaller batch of an epoch is kept.
    lr : float, default=3e-3
        Peak (initial) learning rate, positive.
    weight_decay : float, default=5e-4
        L2 penalty of Adam, non-negative.
    seed : int, default=0
        Seed of the shuffle and of the random state seen by the model and ``augment``.
    augment : callable, optional
        Applied to each training batch ``x`` of shape (N, C, H, W), on ``device``, before the
        forward pass; returns a batch of the same shape. Default: no augmentation.
    device : torch.device or str, optional
        Where to train; default: the device of the model's first parameter. The model is
        moved there.
    progress : bool, default=True
        Show a tqdm bar over the epochs with the epoch's mean loss and training accuracy.

    Returns
    -------
    list of float
        Mean cross-entropy of each epoch over its training images, ``epochs`` entries.

    Raises
    ------
    ValueError
        If ``epochs`` or ``batch_size`` is not a positive integer, ``lr <= 0``,
        ``weight_decay < 0``, ``train_set`` is empty or has no length, or the model has no
        parameters.
    FloatingPointError
        If an epoch's loss is not finite (diverged training; lower ``lr``).

    Examples
    --------
    >>> from torch.utils.data import TensorDataset
    >>> x, y = torch.randn(32, 4), torch.arange(32) % 2
    >>> model = nn.Linear(4, 2)
    >>> losses = train_classifier(model, TensorDataset(x, y), epochs=2, progress=False)
    >>> len(losses), model.training
    (2, False)
    """
    _check_positive_int(epochs, "epochs")
    _check_positive_int(batch_size, "batch_size")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
    _check_non_empty(train_set, "train_set")
    if next(model.parameters(), None) is None:
        raise ValueError("model must have parameters to train; got a model without parameters")
    device = _model_device(model) if device is None else torch.device(device)

    model.to(device)
    # a generator of its own keeps the batch order independent of the random numbers the model
    # and `augment` draw
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    # seed, then restore, the random state of the CPU and of the training GPU, and no other
    if device.type == "cuda":
        cuda_devices = [torch.cuda.current_device() if device.index is None else device.index]
    else:
        cuda_devices = []

    losses: list[float] = []
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress)
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.default_generator.manual_seed(seed)
            for index in cuda_devices:
                torch.cuda.default_generators[index].manual_seed(seed)
            model.train()
            for epoch in bar:
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), dtype=torch.int64, device=device)
                for x, y in loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if augment is not None:
                        x = augment(x)
                    logits = model(x)  # (N, K)
                    loss = F.cross_entropy(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum += loss.detach() * len(y)
                    correct += (logits.detach().argmax(dim=1) == y).sum()
                epoch_loss = loss_sum.item() / len(train_set)
                if not math.isfinite(epoch_loss):
                    raise FloatingPointError(
                        f"training diverged: mean loss of epoch {epoch + 1} is {epoch_loss}; "
                        f"lower lr (got {lr!r})"
                    )
                losses.append(epoch_loss)
                accuracy = correct.item() / len(train_set)
                bar.set_postfix(loss=f"{epoch_loss:.4f}", acc=f"{accuracy:.3f}")
    finally:
        bar.close()
        model.eval()
    logger.info(
        "trained %d epochs on %d images, final loss %.4f", epochs, len(train_set), losses[-1]
    )
    return losses


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on a data set, in eval mode without gradients.

    The model's training mode is restored afterwards. Inputs go to the device of the model's
    first parameter (CPU for a model without parameters).

    Parameters
    ----------
    model : nn.Module
        Classifier mapping a batch ``x`` of shape (N, ...) to logits of shape (N, K).
    dataset : Dataset
        Map-style, non-empty, yields ``(x, y)`` with ``y`` an int64 class index.
    batch_size : int, default=256
        Images per forward pass, at least 1; does not change the result.

    Returns
    -------
    float
        Fraction of images whose arg-max logit equals the label, in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``batch_size`` is not a positive integer, or ``dataset`` is empty or has no length.

    Examples
    --------
    >>> from torch.utils.data import TensorDataset
    >>> model = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
    >>> evaluate_accuracy(model, TensorDataset(torch.eye(2), torch.tensor([0, 0])))
    0.5
    """
    _check_positive_int(batch_size, "batch_size")
    _check_non_empty(dataset, "dataset")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for x, y in DataLoader(dataset, batch_size=batch_size):
            logits = model(x.to(device))  # (N, K)
            correct += int((logits.argmax(dim=1) == y.to(device)).sum())
    finally:
        model.train(was_training)
    return correct / len(dataset)
