"""Fine-tuning a pretrained classifier on new data: SGD, cosine schedule, crop-and-flip augmentation.

Used to adapt the shared CIFAR-10 ResNets to the JPEG copy of the training set (whole network)
and by the shortcut benchmark (last stage only, the rest frozen).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.data.batches import to_unit_float
from covguard.features import model_device

__all__ = ["finetune", "random_crop"]

logger = logging.getLogger(__name__)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each image by ``padding`` pixels and crop it back at a random offset.

    Parameters
    ----------
    x : Tensor of shape (N, C, H, W)
    padding : int
        Pixels added on every side; the offsets are drawn uniformly in ``[0, 2 padding]``.
    generator : torch.Generator
        Source of the offsets (CPU).

    Returns
    -------
    Tensor of shape (N, C, H, W)
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)  # (N, C, H + 2p, W + 2p)
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]  # (N, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (N, C, H, W)


def finetune(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    trainable: Sequence[str] | None = None,
    epochs: int = 3,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    seed: int = 0,
    flip: bool = True,
    crop_padding: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fine-tune a classifier in place, the whole network or only the named modules.

    SGD with Nesterov momentum 0.9 and L2 ``weight_decay``, the learning rate decaying from
    ``lr`` to 0 along a cosine over all steps; random horizontal flips when ``flip``; random
    crops of the zero-padded image when ``crop_padding > 0``. With ``trainable``, every other
    parameter is frozen and every other module stays in eval mode (its BatchNorm statistics
    are kept); the trained modules are in training mode. Seeded and reproducible on CPU. The
    model is left in eval mode with every parameter's ``requires_grad`` restored.

    Parameters
    ----------
    model : nn.Module
        Classifier on ``[0, 1]`` images, trained in place.
    images : Tensor of shape (N, C, H, W)
        uint8 (divided by 255 per batch) or float in ``[0, 1]``.
    labels : Tensor of shape (N,), int64
    trainable : sequence of str, optional
        Names in ``model.named_modules()`` of the modules to train; None trains them all.
    epochs : int, default=3
    lr : float, default=0.01
        Peak learning rate.
    weight_decay : float, default=5e-4
    batch_size : int, default=128
    seed : int, default=0
        Seed of the shuffle and of the augmentation draws.
    flip : bool, default=True
    crop_padding : int, default=0
        Padding of the random crop (4 is the usual CIFAR recipe); 0 disables cropping.
    progress : bool, default=True

    Returns
    -------
    list of float
        Mean cross-entropy of each epoch.

    Raises
    ------
    ValueError
        Unknown ``trainable`` modules; mismatched or empty ``images`` / ``labels``; a
        non-positive ``epochs``, ``batch_size`` or ``lr``; a negative ``crop_padding``.
    FloatingPointError
        If an epoch's loss is not finite.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in trainable or () if name not in modules]
    if unknown:
        raise ValueError(f"trainable modules {unknown} are not modules of the model")
    if images.ndim != 4 or labels.shape != (images.shape[0],) or images.shape[0] == 0:
        raise ValueError(f"images must be (N, C, H, W) with N >= 1 and labels (N,); got {tuple(images.shape)}, {tuple(labels.shape)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0; got {crop_padding!r}")
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    if trainable is None:
        params = list(model.parameters())
    else:
        params = [p for name in trainable for p in modules[name].parameters()]
    device = model_device(model)
    n = images.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        if trainable is None:
            model.train()
        else:
            model.eval()
            for name in trainable:
                modules[name].train()
        for epoch in tqdm(range(epochs), desc="fine-tune", unit="epoch", disable=not progress):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for i in tqdm(range(0, n, batch_size), desc=f"epoch {epoch + 1}", leave=False, disable=not progress):
                idx = order[i : i + batch_size]
                x = images[idx]
                x = to_unit_float(x)  # (n, C, H, W)
                if flip:
                    mirror = torch.rand(len(idx), generator=gen) < 0.5
                    x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
                if crop_padding:
                    x = random_crop(x, crop_padding, gen)
                loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
            losses.append(total / n)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"fine-tuning diverged in epoch {epoch + 1}; lower lr (got {lr})")
            logger.info("fine-tune epoch %d: loss %.4f", epoch + 1, losses[-1])
    finally:
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    return losses
