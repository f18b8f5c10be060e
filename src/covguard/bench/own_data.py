"""``bench ood`` / ``bench adversarial`` on a user's own classifier and image sets.

Two sources plug into :func:`~covguard.bench.ood.run_ood` and
:func:`~covguard.bench.adversarial.run_adversarial`:

- a **model source** yields, per checkpoint name, the model and its :class:`~covguard.bench.common.Taps`:
  :class:`CifarCheckpoints` (the shared CIFAR ResNets, the default) or :class:`OwnCheckpoints`
  (``--checkpoint NAME=PATH``: a model of :data:`covguard.models.MODELS`, or with ``--model-file`` any
  factory, NAME then only labels the run);
- a **data source** yields the ID training set, the ID test set and the OOD sets: :class:`OwnSets`
  (``--id-train``, ``--id-test``, ``--ood NAME=PATH``). Without one the CIFAR-10 / TIN / MNIST sets
  of the data root are used.

Own sets: ID folders or tars hold ``<class>/<image>`` (labels from the sorted class folder names,
:func:`~covguard.data.archives.load_image_folder`); OOD folders or tars hold images at any depth
(labels ignored). Every image is decoded to RGB and resized as OpenOOD does (shorter side to
``image_size``, center crop). The report's near/far grouping becomes one ``ood`` group; uniform
and Gaussian noise at the ID size are reported apart, as on CIFAR-10.

Taps of an own model: ``--layers`` (default: the model's ``feature_layers``; refused without one);
layers whose maps are 1x1 are scored with 1x1 patches, the others with 3x3. The baselines that
read the pooled penultimate features (MDS, RMDS, KNN, ViM, ReAct) use ``--feature-layer``
(default: a module named ``avgpool``), ViM and ReAct also ``--fc-layer`` (default: the last
``nn.Linear``); when the model has no such layer, those baselines are skipped with a warning.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covguard.bench.common import CIFAR_TAPS, Taps, load_cifar_model
from covguard.data.archives import load_image_folder, load_image_tar
from covguard.data.images import BatchDecoder, ImageSet
from covguard.data.synthetic import blank_frames, gaussian_noise, uniform_noise
from covguard.features import FeatureTap, check_layers
from covguard.imagefiles import IMAGE_SUFFIXES, iter_images

__all__ = ["CifarCheckpoints", "OwnCheckpoints", "OwnSets", "parse_named_paths"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_named_paths(values: list[str] | None, option: str) -> dict[str, Path]:
    """``["a=x/y", ...]`` -> ``{"a": Path("x/y")}``; ValueError naming ``option`` for a bad or repeated NAME."""
    out: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise ValueError(f"{option} must be NAME=PATH; got {value!r}")
        if not _NAME.match(name):
            raise ValueError(f"{option} NAME must be letters, digits, '_', '.', '-' (a file-name-safe label); got {name!r}")
        if name in out:
            raise ValueError(f"{option}: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


@dataclass(frozen=True)
class CifarCheckpoints:
    """The shared (or fine-tuned) CIFAR ResNets under the data root, tapped as :data:`CIFAR_TAPS`."""

    root: Path
    checkpoints: str = "original"

    def load(self, name: str, device: str, n_classes: int | None = None) -> tuple[nn.Module, Taps]:
        return load_cifar_model(self.root, name, device, checkpoints=self.checkpoints), CIFAR_TAPS

    def describe(self) -> dict:
        return {}


@dataclass(frozen=True)
class OwnCheckpoints:
    """``--checkpoint NAME=PATH`` models; :meth:`check` validates the options before any data is read."""

    checkpoints: dict[str, Path]
    model_file: str | None = None
    model_args: tuple[str, ...] = ()
    layers: tuple[str, ...] | None = None
    feature_layer: str | None = None
    fc_layer: str | None = None
    image_size: int = 32
    baselines: tuple[str, ...] = ()  # requested, to warn about those skipped
    warned: set = field(default_factory=set, compare=False)

    def check(self) -> OwnCheckpoints:
        from covguard.models import MODELS

        if not self.checkpoints:
            raise ValueError("--checkpoint: give at least one NAME=PATH")
        for name, path in self.checkpoints.items():
            if self.model_file is None and name not in MODELS:
                raise ValueError(
                    f"--checkpoint {name}={path}: NAME must be a model of covguard.models.MODELS ({', '.join(MODELS)}), "
                    "or any label with --model-file PATH.py:FACTORY"
                )
            if not path.is_file():
                raise FileNotFoundError(f"--checkpoint {name}={path}: the weights file does not exist")
        return self

    def describe(self) -> dict:
        model = f"--model-file {self.model_file}" if self.model_file else "covguard.models"
        return {"checkpoint_paths": {k: str(v) for k, v in self.checkpoints.items()}, "weights": f"--checkpoint ({model})"}

    def load(self, name: str, device: str, n_classes: int | None = None) -> tuple[nn.Module, Taps]:
        """The model of ``--checkpoint name=PATH`` in eval mode on ``device``, and where to tap it."""
        from covguard.models.user import load_classifier

        path = self.checkpoints[name]
        try:
            model = load_classifier(name=None if self.model_file else name, model_file=self.model_file, weights=path,
                                    model_args=self.model_args, device=device)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"--checkpoint {name}={path}: {str(err).removeprefix('--weights: ')}") from err
        return model, self._taps(name, model, n_classes)

    def _taps(self, name: str, model: nn.Module, n_classes: int | None) -> Taps:
        modules = dict(model.named_modules())
        convs = [m for m in modules.values() if isinstance(m, nn.Conv2d)]
        if convs and convs[0].in_channels != 3:
            raise ValueError(f"--checkpoint {name}: the model reads {convs[0].in_channels} channels; benchmark images are "
                             "RGB (3): build it with 3 input channels (e.g. --model-arg in_channels=3)")
        layers = self.layers or tuple(getattr(model, "feature_layers", ()) or ())
        if not layers:
            raise ValueError(f"--layers is required: the model of --checkpoint {name} has no feature_layers attribute; "
                             f"name modules that output (N, C, H, W) maps, e.g. among {[n for n in modules if n][:12]}")
        try:
            layers = check_layers(model, layers)
        except ValueError as err:
            raise ValueError(f"--layers: {err}") from None
        feature = self.feature_layer or ("avgpool" if "avgpool" in modules else None)
        if feature is not None and feature not in modules:
            raise ValueError(f"--feature-layer {feature!r} is not a module of the model of --checkpoint {name}")
        fc = self.fc_layer or next((n for n, m in reversed(modules.items()) if isinstance(m, nn.Linear)), None)
        if fc is not None and not isinstance(modules.get(fc), nn.Linear):
            raise ValueError(f"--fc-layer {fc!r} must name an nn.Linear of the model of --checkpoint {name}")
        x = torch.zeros(1, 3, self.image_size, self.image_size, device=next(model.parameters()).device)
        tapped = tuple(dict.fromkeys([*layers, *([feature] if feature else [])]))
        try:
            with torch.no_grad(), FeatureTap(model, tapped) as tap:
                logits, feats = tap(x)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"--checkpoint {name}: the model fails on a {self.image_size}x{self.image_size} RGB image "
                             f"(--image-size): {type(err).__name__}: {err}") from err
        if n_classes is not None and logits.shape[-1] < n_classes:
            raise ValueError(f"--id-train has {n_classes} class folders but the model of --checkpoint {name} "
                             f"outputs {logits.shape[-1]} logits")
        kernel = {}
        for layer in layers:
            f = feats[layer]
            if f.ndim != 4 or (f.shape[-2:] != (1, 1) and min(f.shape[-2:]) < 3):
                raise ValueError(f"--layers: {layer!r} outputs {tuple(f.shape)} on a {self.image_size}x{self.image_size} image; "
                                 "a layer must give (N, C, H, W) maps of at least 3x3 (or pooled 1x1)")
            kernel[layer] = 1 if f.shape[-2:] == (1, 1) else 3
        if feature is not None:
            f = feats[feature]
            if not (f.ndim == 2 or (f.ndim == 4 and f.shape[-2:] == (1, 1))):
                raise ValueError(f"--feature-layer {feature!r} must output pooled features (N, C) or (N, C, 1, 1); "
                                 f"got {tuple(f.shape)}")
            if fc is not None and modules[fc].in_features != f.shape[1]:
                raise ValueError(f"--fc-layer {fc!r} takes {modules[fc].in_features} inputs but --feature-layer "
                                 f"{feature!r} gives {f.shape[1]}")
        taps = Taps(layers, kernel, feature, fc)
        skipped = [b for b in self.baselines if b not in taps.usable(self.baselines)]
        if skipped and name not in self.warned:
            self.warned.add(name)
            missing = "--feature-layer (no module named avgpool)" if feature is None else "--fc-layer (no nn.Linear)"
            warnings.warn(f"--checkpoint {name}: baselines {skipped} skipped: name the layer with {missing}", stacklevel=2)
        return taps


def _id_set(path: Path, option: str, size: int, progress: bool) -> ImageSet:
    """A ``<class>/<image>`` folder or tar, with errors naming ``option``."""
    if path.is_dir():
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subdirs:
            raise ValueError(f"{option} {str(path)!r} has no class folders: it must hold <class>/<image> files")
        empty = [p.name for p in subdirs if not any(q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir())]
        if empty:
            raise ValueError(f"{option} {str(path)!r}: class folders {empty[:5]} hold no images")
        loader = load_image_folder
    elif path.is_file():
        loader = load_image_tar
    else:
        raise FileNotFoundError(f"{option} {str(path)!r} is neither a folder nor a tar archive")
    try:
        return loader(path, size=size, name=option.lstrip("-").replace("-", "_"), progress=progress)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{option}: {err}") from err


def _any_images(path: Path, option: str, size: int, progress: bool) -> torch.Tensor:
    """Images (N, 3, size, size) uint8 of a folder (any depth) or tar, labels ignored; errors name ``option``."""
    if not path.exists():
        raise FileNotFoundError(f"{option} {str(path)!r} does not exist")
    try:
        total, items = iter_images(path)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from err
    if total == 0:
        raise ValueError(f"{option} {str(path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    decoder = BatchDecoder(total, size=size, name=path.name, source=f"{option} {path}", progress=progress)
    for i, (name, data) in enumerate(items):
        decoder.add(i, name, data)
    return decoder.finish(np.zeros(total, dtype=np.int64), ()).images


@dataclass(frozen=True)
class OwnSets:
    """``--id-train`` / ``--id-test`` ``<class>/<image>`` sets and ``--ood NAME=PATH`` sets (may be empty: adversarial)."""

    id_train: Path
    id_test: Path
    ood: dict[str, Path] = field(default_factory=dict)
    image_size: int = 32

    def check(self) -> OwnSets:
        for option, path in (("--id-train", self.id_train), ("--id-test", self.id_test),
                             *((f"--ood {k}={v}", v) for k, v in self.ood.items())):
            if not path.exists():
                raise FileNotFoundError(f"{option} {str(path)!r} does not exist")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be in [8, 1024]; got {self.image_size}")
        return self

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return {"ood": tuple(self.ood)}

    def describe(self) -> dict:
        return {"own_sets": {"id_train": str(self.id_train), "id_test": str(self.id_test),
                             "ood": {k: str(v) for k, v in self.ood.items()}, "image_size": self.image_size}}

    def train(self, progress: bool) -> ImageSet:
        return _id_set(self.id_train, "--id-train", self.image_size, progress)

    def test(self, classes: tuple[str, ...], progress: bool) -> ImageSet:
        test = _id_set(self.id_test, "--id-test", self.image_size, progress)
        if test.classes != classes:
            raise ValueError(f"--id-test class folders {list(test.classes)[:10]} differ from those of --id-train {list(classes)[:10]}")
        return test

    def eval_sets(self, classes: tuple[str, ...], *, max_eval: int | None, n_noise: int, seed: int, progress: bool) -> dict:
        """As :func:`covguard.bench.ood.eval_sets`: seeded subsets of ``max_eval``, the OOD sets, then the noise sets."""
        def pick(n: int) -> torch.Tensor:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            return order if max_eval is None else order[:max_eval]

        test = self.test(classes, progress)
        index = pick(len(test))
        ood = {}
        for name, path in self.ood.items():
            images = _any_images(path, f"--ood {name}={path}", self.image_size, progress)
            ood[name] = images[pick(len(images))]
        n = n_noise if max_eval is None else min(n_noise, max_eval)
        s = self.image_size
        ood["uniform_noise"] = (uniform_noise(n, size=s, channels=3, seed=seed) * 255).round().to(torch.uint8)
        ood["gaussian_noise"] = (gaussian_noise(n, size=s, channels=3, seed=seed) * 255).round().to(torch.uint8)
        ood["blank"] = (blank_frames(n, size=s, channels=3, seed=seed) * 255).round().to(torch.uint8)
        return {"id": (test.images[index], test.labels[index]), "ood": ood, "split": None}

