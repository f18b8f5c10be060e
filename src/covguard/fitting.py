"""Build a calibrated guard from a folder or tar of images: the library side of ``covguard fit``.

Layout of the training images (``--train PATH``), a folder or a tar archive (any compression,
read in place):

- labeled (``--detector class``): ``<class>/<image>``, as ``torchvision``'s ``ImageFolder`` and
  :func:`covguard.data.archives.load_image_folder`: labels follow the **sorted class folder
  names**, which must be as many as the model has outputs. In a folder, a class is a
  subfolder of PATH (its images at any depth below it); in a tar archive, a class is the
  parent folder of each image, under one common prefix (as :func:`~covguard.data.archives.load_image_tar`).
- unlabeled (``--detector simple``): any images, at any depth (labels are not read).

Images are decoded exactly as ``covguard score`` decodes them (:func:`covguard.guard.decode_image`:
PIL, converted to the model's input channels, bilinear resize without crop, float32 in
``[0, 1]``), so that a guard sees the same pixels at fit and at score time. The input size is
the most common image size, and images of another size are resized with one warning (or
``image_size``, given: no warning). Files PIL cannot read are skipped, with one warning.

A seeded share of the images (``calibration_fraction``) is held out: it alone standardizes
the layer scores and sets the threshold (:meth:`covguard.Guard.calibrate`); the rest fits the
detector's statistics.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.detectors import ClassMahalanobis, SimpleMahalanobis
from covguard.detectors.base import eval_mode
from covguard.features import FeatureTap, model_device
from covguard.guard import IMAGE_SUFFIXES, Guard, decode_image

__all__ = [
    "DETECTOR_KINDS",
    "FitConfig",
    "FitSummary",
    "TrainingImages",
    "add_fit_arguments",
    "default_layers",
    "fit_guard",
    "input_channels",
    "read_training_images",
    "run_fit_cli",
    "split_calibration",
]

logger = logging.getLogger(__name__)

#: ``--detector`` name -> detector class.
DETECTOR_KINDS = {"class": ClassMahalanobis, "simple": SimpleMahalanobis}
_MIN_CALIBRATION = 2  # images that standardize layer scores (a variance needs two)


@dataclass(frozen=True, eq=False)
class TrainingImages:
    """Decoded training images, as ``covguard score`` would see them.

    Attributes
    ----------
    images : Tensor of shape (N, C, H, W), uint8
        Pixels; :meth:`float` gives the model's input.
    labels : Tensor of shape (N,), int64, or None
        Indices into ``classes`` (None for unlabeled images).
    classes : tuple of str
        Sorted class folder names (empty for unlabeled images).
    names : tuple of str
        Path of each image relative to the folder, or its member name in the archive.
    source : str
        The folder or archive.
    resized : int
        Images that were not ``H x W`` and were resized.
    skipped : int
        Files that could not be decoded (not in ``images``).
    """

    images: Tensor
    labels: Tensor | None
    classes: tuple[str, ...]
    names: tuple[str, ...]
    source: str
    resized: int = 0
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def float(self, index: Tensor | None = None) -> Tensor:
        """Images (of ``index``) as float32 ``[0, 1]``, (n, C, H, W): bit-identical to :func:`covguard.guard.decode_image`."""
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0)


# ---- listing and decoding ----------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _list_folder(root: Path, labeled: bool) -> list[tuple[str, str | None, Path]]:
    """(name, class or None, file) of every image under ``root``, in sorted name order."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name))
    if not files:
        raise ValueError(f"--train {str(root)!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    entries = [(p.relative_to(root).as_posix(), p) for p in files]
    if not labeled:
        return [(name, None, p) for name, p in entries]
    loose = [name for name, _ in entries if "/" not in name]
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if loose:
        where = f"and class folders {class_dirs[:5]}" if class_dirs else "and no class folders"
        raise ValueError(
            f"--train {str(root)!r} holds images directly under it ({loose[:3]}) {where}: --detector class needs "
            "labeled images in <class>/<image> folders; use --detector simple for unlabeled images"
        )
    with_images = {name.split("/", 1)[0] for name, _ in entries}
    empty = [c for c in class_dirs if c not in with_images]
    if empty:
        raise ValueError(f"--train {str(root)!r}: class folders {empty[:5]} hold no images")
    return [(name, name.split("/", 1)[0], p) for name, p in entries]


def _list_tar(path: Path, labeled: bool) -> list[tuple[str, str | None, tarfile.TarInfo]]:
    """(member name, class or None, member) of every image member, in sorted name order."""
    from covguard.data.archives import open_tar, tar_members

    with open_tar(path) as archive:
        members = tar_members(archive, path)
    images = sorted((m for m in members if m.isfile() and _is_image(m.name)), key=lambda m: m.name)
    if not images:
        raise ValueError(f"--train {str(path)!r} is a tar archive without image members ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not labeled:
        return [(m.name, None, m) for m in images]
    parts = [PurePosixPath(m.name) for m in images]
    loose = [m.name for m, p in zip(images, parts) if str(p.parent) in ("", ".")]
    if loose:
        raise ValueError(
            f"--train {str(path)!r} holds images at the top of the archive ({loose[:3]}): --detector class needs "
            "labeled images in <class>/<image> members; use --detector simple for unlabeled images"
        )
    prefixes = sorted({str(p.parent.parent) for p in parts})
    if len(prefixes) > 1:
        raise ValueError(
            f"--train {str(path)!r} holds images under several folders {prefixes[:5]}: a labeled archive needs "
            "<prefix>/<class>/<image> members with one prefix"
        )
    prefix = PurePosixPath(prefixes[0])
    with_images = {p.parent.name for p in parts}
    empty = sorted(
        PurePosixPath(m.name).name for m in members
        if m.isdir() and PurePosixPath(m.name).parent == prefix and PurePosixPath(m.name).name not in with_images
    )
    if empty:
        raise ValueError(f"--train {str(path)!r}: class folders {empty[:5]} hold no images")
    return [(m.name, p.parent.name, m) for m, p in zip(images, parts)]


def _read_bytes(path: Path, labeled: bool) -> tuple[int, Iterator[tuple[str, str | None, bytes]]]:
    """Number of images and an iterator of (name, class, encoded bytes)."""
    if path.is_dir():
        entries = _list_folder(path, labeled)
        return len(entries), ((name, c, p.read_bytes()) for name, c, p in entries)
    if not path.exists():
        raise FileNotFoundError(f"--train {str(path)!r} does not exist")
    if not tarfile.is_tarfile(path):
        raise ValueError(f"--train {str(path)!r} must be a folder or a tar archive of images")
    entries = _list_tar(path, labeled)

    def read() -> Iterator[tuple[str, str | None, bytes]]:
        with tarfile.open(path, mode="r:*") as archive:
            for name, c, member in entries:
                handle = archive.extractfile(member)
                yield name, c, b"" if handle is None else handle.read()

    return len(entries), read()


def _image_size(data: bytes) -> tuple[int, int] | str:
    """(H, W) from the image header, or the reason PIL cannot read it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            return img.size[1], img.size[0]
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def read_training_images(
    path: str | Path,
    *,
    channels: int,
    labeled: bool,
    image_size: tuple[int, int] | None = None,
    progress: bool = True,
) -> TrainingImages:
    """Read and decode the images of a folder or tar archive (see the module docstring for the layout).

    Parameters
    ----------
    path : str or Path
        Folder or tar archive.
    channels : {1, 3}
        The model's input channels (PIL ``L`` or ``RGB``).
    labeled : bool
        Read ``<class>/<image>`` labels (sorted class names -> 0, 1, ...).
    image_size : (int, int), optional
        Input (H, W); default: the most common size among the images.
    progress : bool
        Show progress bars.

    Returns
    -------
    TrainingImages

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        No images; images outside class folders or an empty class folder (``labeled``); no
        image could be decoded.
    """
    path = Path(path)
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise ValueError(f"--image-size must be two positive integers H W; got {image_size}")
    total, items = _read_bytes(path, labeled)
    found: list[tuple[str, str | None, bytes, tuple[int, int]]] = []
    failed: list[tuple[str, str]] = []
    classes = set()  # every class folder with image files, decodable or not: labels do not shift
    for name, c, data in tqdm(items, total=total, desc="read", unit="img", disable=not progress, leave=False):
        classes.add(c)
        size = _image_size(data)
        if isinstance(size, str):
            failed.append((name, size))
        else:
            found.append((name, c, data, size))
    sizes = Counter(size for *_, size in found)
    target = tuple(image_size) if image_size is not None else (sizes.most_common(1)[0][0] if sizes else (1, 1))
    kept, pixels = [], []
    for name, c, data, size in tqdm(found, desc="decode", unit="img", disable=not progress, leave=False):
        try:
            x = decode_image(data, channels=channels, size=target)  # (C, H, W) float32, k / 255
        except ValueError as err:  # a header that reads, a body that does not (truncated file)
            failed.append((name, str(err)))
            continue
        kept.append((name, c, size))
        pixels.append(x.mul_(255.0).round_().to(torch.uint8))
    if failed:
        warnings.warn(
            f"--train {str(path)!r}: skipped {len(failed)} of {total} files that cannot be decoded "
            f"(first: {failed[0][0]}: {failed[0][1]})",
            UserWarning,
            stacklevel=2,
        )
    if not kept:
        raise ValueError(f"--train {str(path)!r}: none of its {total} image files can be decoded")
    resized = sum(size != target for *_, size in kept)
    if resized and image_size is not None:
        logger.info("%s: resized %d of %d images to %dx%d", path, resized, len(kept), *target)
    elif resized:
        shown = ", ".join(f"{h}x{w}" for h, w in list(sizes)[:5])
        warnings.warn(
            f"--train {str(path)!r}: {resized} of {len(kept)} images are not {target[0]}x{target[1]} "
            f"(sizes found: {shown}); they are resized to {target[0]}x{target[1]} with bilinear interpolation, "
            "no crop, as covguard score resizes",
            UserWarning,
            stacklevel=2,
        )
    pixels = torch.stack(pixels)  # (N, C, H, W) uint8
    names = tuple(name for name, *_ in kept)
    if not labeled:
        return TrainingImages(pixels, None, (), names, str(path), resized, len(failed))
    classes = tuple(sorted(classes))
    index = {c: k for k, c in enumerate(classes)}
    labels = torch.tensor([index[c] for _, c, *_ in kept], dtype=torch.int64)
    return TrainingImages(pixels, labels, classes, names, str(path), resized, len(failed))


# ---- the model ---------------------------------------------------------------------------------


def input_channels(model: nn.Module) -> int:
    """Input channels of a classifier: ``in_channels`` of its first ``Conv2d``.

    Raises
    ------
    ValueError
        The model has no ``Conv2d`` (pass the channels explicitly) or it reads neither 1 nor 3 channels.
    """
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("cannot tell the model's input channels (it has no Conv2d): pass --channels 1 or 3")
    if conv.in_channels not in (1, 3):
        raise ValueError(f"the model's first Conv2d reads {conv.in_channels} channels; image files give 1 (grey) or 3 (RGB)")
    return conv.in_channels


def _probe(model: nn.Module, x: Tensor, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and feature maps of one image, with model errors reported as input errors."""
    try:
        with eval_mode(model), torch.no_grad(), FeatureTap(model, layers) as tap:
            return tap(x)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"the model fails on a training image of shape {tuple(x.shape)}: {type(err).__name__}: {err}"
        ) from err


def default_layers(model: nn.Module, x: Tensor, kernel_size: int = 3) -> tuple[str, ...]:
    """The model's stages: ``model.feature_layers`` whose maps hold at least one ``kernel_size`` patch on ``x``.

    Parameters
    ----------
    model : nn.Module
    x : Tensor of shape (1, C, H, W)
        One input image (sets the map sizes).
    kernel_size : int

    Raises
    ------
    ValueError
        The model lists no ``feature_layers``, or none of them gives a large enough map.
    """
    names = getattr(model, "feature_layers", None)
    if not names:
        convs = [name for name, m in model.named_modules() if name and isinstance(m, (nn.Conv2d, nn.Sequential))]
        raise ValueError(
            "--layers is required: the model has no feature_layers attribute naming its stages; "
            f"pick modules that output (N, C, H, W) maps, e.g. among {convs[:12]}"
        )
    _, feats = _probe(model, x, names)
    layers = tuple(n for n, f in feats.items() if f.ndim == 4 and min(f.shape[-2:]) >= kernel_size)
    dropped = [n for n in names if n not in layers]
    if dropped:
        logger.info("default layers: %s (dropped %s: maps smaller than %dx%d)", layers, dropped, kernel_size, kernel_size)
    if not layers:
        raise ValueError(f"none of the model's feature_layers {list(names)} outputs a map of at least {kernel_size}x{kernel_size}")
    return layers


# ---- split, fit, calibrate ---------------------------------------------------------------------


def split_calibration(n: int, fraction: float, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded split of ``n`` images into a fit part and a held-out calibration part.

    Parameters
    ----------
    n : int
    fraction : float
        Share held out, in (0, 1); ``round(fraction * n)`` images.
    seed : int

    Returns
    -------
    fit_index, calibration_index : Tensor of shape (n - m,) and (m,), int64, each sorted
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--calibration-fraction must be in (0, 1); got {fraction}")
    m = round(fraction * n)
    if m < _MIN_CALIBRATION or n - m < 1:
        raise ValueError(
            f"--calibration-fraction {fraction} of {n} images holds out {m} and fits on {n - m}: at least "
            f"{_MIN_CALIBRATION} held-out images and 1 fit image are needed (use more images or another fraction)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[m:].sort().values, order[:m].sort().values


class _Batches:
    """Re-iterable batches of ``data`` at ``index``: float32 images, with labels where known."""

    def __init__(self, data: TrainingImages, index: Tensor, batch_size: int, dtype: torch.dtype, with_labels: bool) -> None:
        self.data, self.index, self.batch_size, self.dtype = data, index, batch_size, dtype
        self.with_labels = with_labels and data.labels is not None

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        for start in range(0, len(self.index), self.batch_size):
            rows = self.index[start : start + self.batch_size]
            x = self.data.float(rows).to(self.dtype)  # (n, C, H, W)
            yield (x, self.data.labels[rows]) if self.with_labels else x


@dataclass(frozen=True)
class FitConfig:
    """What ``covguard fit`` fits (the CLI options)."""

    detector: str = "class"  # "class" (labels, class-conditional) or "simple" (one Gaussian per layer)
    layers: tuple[str, ...] | None = None  # None: the model's feature_layers with maps of >= 3x3
    covariance: str = "full"  # "full", "diag" or "lowrank"
    rank: int = 64  # eigenpairs kept by "lowrank"
    calibration_fraction: float = 0.1  # held-out share: standardizes layer scores and sets the threshold
    tpr: float = 0.95  # share of held-out in-distribution images accepted
    batch_size: int = 64
    seed: int = 0  # of the calibration split
    progress: bool = True

    def __post_init__(self) -> None:
        if self.detector not in DETECTOR_KINDS:
            raise ValueError(f"--detector must be one of {sorted(DETECTOR_KINDS)}; got {self.detector!r}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(f"--calibration-fraction must be in (0, 1); got {self.calibration_fraction}")
        if not 0.0 < self.tpr <= 1.0:
            raise ValueError(f"--tpr must be in (0, 1]; got {self.tpr}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1; got {self.batch_size}")
        if self.rank < 1:
            raise ValueError(f"--rank must be >= 1; got {self.rank}")


@dataclass(frozen=True)
class FitSummary:
    """What a fit used and produced."""

    n_fit: int
    n_calibration: int
    classes: tuple[str, ...]
    layers: tuple[str, ...]
    input_shape: tuple[int, int, int]
    threshold: float
    tpr: float
    achieved_tpr: float
    seconds: float

    def render(self, out: str | Path) -> str:
        """The summary ``covguard fit`` prints."""
        c, h, w = self.input_shape
        labels = f", {len(self.classes)} classes" if self.classes else ", unlabeled"
        return (
            f"fitted on {self.n_fit} images, calibrated on {self.n_calibration} held out ({c}x{h}x{w}{labels})\n"
            f"layers: {', '.join(self.layers)}\n"
            f"threshold: {self.threshold:.6g} (accepts {100 * self.achieved_tpr:.1f}% of the held-out images, "
            f"target {100 * self.tpr:.1f}%)\n"
            f"fit time: {self.seconds:.1f} s; wrote {out}"
        )


def fit_guard(model: nn.Module, data: TrainingImages, config: FitConfig) -> tuple[Guard, FitSummary]:
    """Fit a detector on ``data`` minus a seeded held-out share, standardize and calibrate on that share.

    Parameters
    ----------
    model : nn.Module
        Trained classifier in eval mode, images (N, C, H, W) in ``[0, 1]`` -> logits (N, K).
    data : TrainingImages
        Labeled (as many classes as the model has outputs) for ``detector="class"``.
    config : FitConfig

    Returns
    -------
    guard : Guard
        Fitted and calibrated.
    summary : FitSummary
    """
    tic = time.perf_counter()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    probe = data.float(torch.tensor([0])).to(dtype=dtype, device=model_device(model))  # (1, C, H, W)
    layers = config.layers or default_layers(model, probe)
    logits, _ = _probe(model, probe, layers)
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits (N, K); got shape {tuple(logits.shape)}")
    labeled = config.detector == "class"
    if labeled:
        if data.labels is None:
            raise ValueError("--detector class needs labeled images in <class>/<image> folders")
        if len(data.classes) != logits.shape[1]:
            raise ValueError(
                f"--train {data.source!r} has {len(data.classes)} class folders ({list(data.classes)[:5]}...) but the "
                f"model has {logits.shape[1]} outputs: labels follow the sorted folder names, one folder per class"
            )
    fit_index, cal_index = split_calibration(len(data), config.calibration_fraction, seed=config.seed)
    fit_batches = _Batches(data, fit_index, config.batch_size, dtype, with_labels=labeled)
    cal_batches = _Batches(data, cal_index, config.batch_size, dtype, with_labels=False)
    detector = DETECTOR_KINDS[config.detector](model, layers=layers, covariance=config.covariance, rank=config.rank)
    detector.fit(fit_batches, holdout=cal_batches, progress=config.progress)
    guard = Guard(model, detector).calibrate(cal_batches, tpr=config.tpr, progress=config.progress)
    calibration = guard.calibration_
    summary = FitSummary(
        n_fit=len(fit_index), n_calibration=len(cal_index), classes=data.classes if labeled else (),
        layers=tuple(layers), input_shape=tuple(data.images.shape[1:]), threshold=calibration.threshold,
        tpr=calibration.tpr, achieved_tpr=calibration.achieved_tpr, seconds=time.perf_counter() - tic,
    )
    return guard, summary


# ---- command line ------------------------------------------------------------------------------


def add_fit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``covguard fit`` to ``parser`` and set ``func`` to :func:`run_fit_cli`."""
    from covguard.covariance import COVARIANCE_FORMS
    from covguard.models.user import add_model_arguments

    d = FitConfig()
    add_model_arguments(parser)
    parser.add_argument("--train", required=True, metavar="PATH",
                        help="folder or tar of <class>/<image> (labels: sorted folder names); any images for --detector simple")
    parser.add_argument("--out", required=True, help="guard file to write (safetensors)")
    parser.add_argument("--detector", choices=sorted(DETECTOR_KINDS), default=d.detector,
                        help="class: class-conditional Gaussians (needs labels); simple: one Gaussian per layer")
    parser.add_argument("--layers", nargs="+", default=None, help="modules to tap (default: the model's feature_layers)")
    parser.add_argument("--covariance", choices=COVARIANCE_FORMS, default=d.covariance)
    parser.add_argument("--rank", type=int, default=d.rank, help="eigenpairs kept by --covariance lowrank")
    parser.add_argument("--calibration-fraction", type=float, default=d.calibration_fraction,
                        help="seeded held-out share of PATH that standardizes layer scores and sets the threshold")
    parser.add_argument("--tpr", type=float, default=d.tpr, help="share of held-out in-distribution images accepted")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration split")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input size (default: the most common image size; others are resized)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="input channels (default: those of the model's first Conv2d)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N", help="CPU threads of torch")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run_fit_cli)
    return parser


def run_fit_cli(args: argparse.Namespace) -> int:
    """Run ``covguard fit``; every bad input is one line ``covguard fit: error: ...`` on stderr, exit status 2."""
    try:
        return _fit(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"covguard fit: error: {err}", file=sys.stderr)
        return 2


def _fit(args: argparse.Namespace) -> int:
    from covguard.models.user import build_model

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"--out {args.out!r} exists; pass --force to overwrite it")
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; name the guard file to write")
    config = FitConfig(
        detector=args.detector, layers=None if args.layers is None else tuple(args.layers), covariance=args.covariance,
        rank=args.rank, calibration_fraction=args.calibration_fraction, tpr=args.tpr, batch_size=args.batch_size,
        seed=args.seed, progress=not args.no_progress,
    )
    model = build_model(
        name=args.model, model_file=args.model_file, weights=args.weights, model_args=args.model_arg, device=args.device
    )
    channels = args.channels or input_channels(model)
    data = read_training_images(
        args.train, channels=channels, labeled=config.detector == "class",
        image_size=None if args.image_size is None else tuple(args.image_size), progress=config.progress,
    )
    guard, summary = fit_guard(model, data, config)
    guard.save(out)  # written to a temporary file, then renamed
    print(summary.render(out))
    return 0
