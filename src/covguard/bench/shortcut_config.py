"""Settings of the shortcut benchmark (:mod:`covguard.bench.shortcut`) and its fixed choices."""

from __future__ import annotations

from dataclasses import dataclass, replace

from covguard.detectors.baselines import BASELINES

__all__ = ["DATASETS", "HEADLINE", "ROC_BASELINES", "SHIFTS", "ShortcutConfig"]

DATASETS = ("digits", "cifar10")
#: Detector shown first and drawn in the heatmaps: fixed before any shortcut test data was scored.
HEADLINE = "class_mahalanobis_top1"
#: Baselines drawn in the ROC figures next to the patch detectors (all are in the tables).
ROC_BASELINES = ("msp", "energy", "mds", "knn", "vim")
SHIFTS = ("removed", "moved")

# Per-dataset defaults of the fields left None in ShortcutConfig.
_DEFAULTS = {
    "digits": {"marker_size": (3, 8), "epochs": 30, "lr": 3e-3, "layers": ("block1", "block2", "block3"), "fc_layer": "fc"},
    "cifar10": {
        "marker_size": (4, 12), "epochs": 3, "lr": 0.01, "layers": ("layer1", "layer2", "layer3", "avgpool"), "fc_layer": "linear",
    },
}


@dataclass(frozen=True)
class ShortcutConfig:
    """Settings of the shortcut benchmark; the defaults are what ``covguard bench shortcut`` runs.

    Fields left None take the dataset's default (:meth:`resolved`; written resolved into
    ``results.json``).
    """

    dataset: str = "digits"  # "digits" (embedded, seconds) or "cifar10" (shared data, fine-tunes ResNet-20's last stage)
    classes: tuple[int | str, ...] = (0, 1)  # shortcut classes: indices or names (e.g. "airplane")
    p_marked: float = 0.95  # marker probability on training images of the shortcut classes
    p_other: float = 0.01  # marker probability on the other training images
    marker_size: tuple[int, int] | None = None  # (height, width) in pixels; None: 3x8 (digits), 4x12 (CIFAR-10)
    position: str = "random"  # "random", "corners" or "fixed" (top-left corner)
    seed: int = 0  # data split, marker draws, training, subsets
    epochs: int | None = None  # None: 30 (digits, from scratch), 3 (CIFAR-10 fine-tuning)
    lr: float | None = None  # None: 3e-3 Adam (digits), 0.01 SGD + momentum (CIFAR-10)
    size: int = 16  # digits: image side
    data: str | None = None  # CIFAR-10: data root; None = $COVGUARD_DATA or ../shared/data
    model: str = "resnet20"  # CIFAR-10: shared checkpoint to fine-tune
    max_finetune: int | None = None  # CIFAR-10: cap on fine-tuning images (seeded subset); None = all but the holdout
    n_holdout: int = 5000  # CIFAR-10: marked training images held out to standardize layer scores
    max_train: int | None = None  # cap on detector fit images; None = all (but the holdout)
    max_test: int | None = None  # cap on test images (seeded subset); None = all
    layers: tuple[str, ...] | None = None  # tapped layers; None: block1..3 (digits), layer1..3 + avgpool (CIFAR-10)
    covariance: str = "full"  # patch covariance form of our detectors
    baselines: tuple[str, ...] = ("msp", "max_logit", "energy", "odin", "gen", "mds", "rmds", "knn", "vim", "react")
    n_heatmaps: int = 6  # fooled (c) images drawn as heatmaps of the headline detector
    batch_size: int = 128
    device: str = "cpu"
    progress: bool = True
    fc_layer: str | None = None  # classifier layer of the feature baselines; None: fc (digits), linear (CIFAR-10)

    def resolved(self) -> ShortcutConfig:
        """A copy with the dataset's defaults in the fields left None, validated.

        Raises
        ------
        ValueError
            For an unknown dataset or baseline, a marker size that is not (height, width), or
            ``epochs``, ``batch_size`` < 1 or ``n_heatmaps`` < 0.
        """
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}; got {self.dataset!r}")
        defaults = {key: value for key, value in _DEFAULTS[self.dataset].items() if getattr(self, key) is None}
        cfg = replace(self, **defaults)
        cfg = replace(
            cfg, classes=tuple(cfg.classes), layers=tuple(cfg.layers), baselines=tuple(cfg.baselines), marker_size=tuple(cfg.marker_size)
        )
        unknown = [name for name in cfg.baselines if name not in BASELINES]
        if unknown:
            raise ValueError(f"baselines {unknown} are unknown; choose from {sorted(BASELINES)}")
        if len(cfg.marker_size) != 2:
            raise ValueError(f"marker_size must be (height, width); got {self.marker_size!r}")
        for name in ("epochs", "batch_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(cfg, name)}")
        if cfg.n_heatmaps < 0:
            raise ValueError(f"n_heatmaps must be >= 0; got {cfg.n_heatmaps}")
        return cfg
