"""What the suite scores: the in-distribution draw, the OOD / noise / blank sets, the calibration
split of the training set, and the attacks (built with the adversarial benchmark's settings).

Every set is seeded and every image set comes out as (N, 3, 32, 32) uint8, like the loaders'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.attacks import ATTACKS, Attack
from covguard.bench.suite_config import SuiteConfig
from covguard.data.images import ImageSet, jpeg_matched
from covguard.data.registry import load_set
from covguard.data.synthetic import blank_frames, gaussian_noise, uniform_noise

__all__ = ["EvalSets", "build_attack", "calibration_split", "craft", "eval_sets", "to_uint8"]

#: Added to the seed for the calibration split, so that it is drawn apart from split_train's permutation.
CALIBRATION_SEED_OFFSET = 1


@dataclass(frozen=True)
class EvalSets:
    """The in-distribution draw and the image sets of the OOD, noise and blank categories."""

    id_images: Tensor  # (n, 3, 32, 32) uint8, CIFAR-10 test images drawn with the seed
    id_labels: Tensor  # (n,) int64
    ood: dict[str, Tensor]  # category -> (m, 3, 32, 32) uint8


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] float images as uint8 pixels (rounded), the form of every real set."""
    return (x * 255).round_().to(torch.uint8)


def _seeded_pick(images: Tensor, n: int, seed: int) -> Tensor:
    """A seeded subset of ``n`` images (all of them when there are fewer): loaders return class-sorted order."""
    if len(images) <= n:
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


def eval_sets(root: Path, cfg: SuiteConfig) -> EvalSets:
    """The CIFAR-10 test draw and every OOD, noise and blank set, ``cfg.n_images`` images each.

    The test draw is the first ``n_images`` of a permutation seeded with ``cfg.seed`` (as
    ``bench ood`` and ``bench adversarial`` draw theirs); the OOD sets are seeded subsets of
    CIFAR-100, Tiny ImageNet and MNIST, MNIST also JPEG-matched; noise and blank frames are
    generated with the seed.
    """
    test = load_set("cifar10_test", root, progress=cfg.progress)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_images]
    n = cfg.n_images
    mnist = _seeded_pick(load_set("mnist", root, progress=cfg.progress).images, n, cfg.seed)
    ood = {
        "cifar100": _seeded_pick(load_set("cifar100", root, progress=cfg.progress).images, n, cfg.seed),
        "tin": _seeded_pick(load_set("tin", root, progress=cfg.progress).images, n, cfg.seed),
        "mnist": mnist,
        "mnist_jpeg": jpeg_matched(mnist),
        "uniform_noise": to_uint8(uniform_noise(n, size=32, channels=3, seed=cfg.seed)),
        "gaussian_noise": to_uint8(gaussian_noise(n, size=32, channels=3, seed=cfg.seed)),
        "blank": to_uint8(blank_frames(n, size=32, channels=3, seed=cfg.seed)),
    }
    return EvalSets(id_images=test.images[pick], id_labels=test.labels[pick], ood=ood)


def calibration_split(train: ImageSet, n_calibration: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(the rest, ``n_calibration`` calibration images): a seeded split of the training set.

    The rest goes to :func:`~covguard.bench.common.fit_on_train`, which splits it again into fit
    images and the ``n_holdout`` images that standardize layer scores: fit, holdout and
    calibration are disjoint, and none of them is test data.
    """
    if not 2 <= n_calibration < len(train) - 2:
        raise ValueError(f"n_calibration must be in [2, {len(train) - 2}) for {len(train)} training images; got {n_calibration}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + CALIBRATION_SEED_OFFSET))
    cal, rest = order[:n_calibration].sort().values, order[n_calibration:].sort().values

    def part(rows: Tensor, name: str) -> ImageSet:
        return ImageSet(train.images[rows], train.labels[rows], train.classes, name=name, source=train.source)

    return part(rest, f"{train.name}-fit"), part(cal, f"{train.name}-calibration")


def build_attack(name: str, model: nn.Module, eps: float, cfg: SuiteConfig, generator: torch.Generator) -> Attack:
    """An attack with ``bench adversarial``'s settings: step 2.5 eps / steps for PGD, PGD-L2, IGM;
    FGSM and BIM with their defaults (BIM: step 1/255, Kurakin's step count)."""
    if name in ("fgsm", "bim"):
        return ATTACKS[name](model, eps=eps)
    alpha = 2.5 * eps / cfg.steps
    if name in ("pgd", "pgd_l2"):
        return ATTACKS[name](model, eps=eps, alpha=alpha, steps=cfg.steps, generator=generator)
    if name == "igm":
        return ATTACKS[name](model, eps=eps, alpha=alpha, steps=cfg.steps, m=cfg.igm_scales, generator=generator)
    raise ValueError(f"attack must be one of fgsm, bim, pgd, pgd_l2, igm; got {name!r}")


def attack_settings(name: str, eps: float, cfg: SuiteConfig) -> dict:
    """What an attack's output depends on besides the model and the images: part of its cache key."""
    out: dict = {"attack": name, "eps": eps, "seed": cfg.seed}
    if name in ("pgd", "pgd_l2", "igm"):
        out["steps"] = cfg.steps
    if name == "igm":
        out["igm_scales"] = cfg.igm_scales
    return out


def craft(attack: Attack, x: Tensor, y: Tensor, cfg: SuiteConfig, desc: str) -> Tensor:
    """Adversarial images (N, C, H, W) float32 on the CPU, in batches of ``cfg.batch_size``."""
    starts = tqdm(range(0, len(x), cfg.batch_size), desc=desc, unit="batch", disable=not cfg.progress, leave=False)
    bs, device = cfg.batch_size, cfg.device
    return torch.cat([attack(x[i : i + bs].to(device), y[i : i + bs].to(device)).cpu() for i in starts])
