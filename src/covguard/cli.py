"""Command-line interface: ``covguard demo``, ``fit``, ``score``, ``export``, ``heatmap``, ``bench adversarial|ood|shortcut|suite|timing|throughput``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from covguard import commands
from covguard.covariance import COVARIANCE_FORMS

__all__ = ["main"]


def _add_bench_common(
    parser: argparse.ArgumentParser, out: str, *, models: bool = True, protocol: bool = True, batch_size: int = 256,
    lineup: bool = True,
) -> None:
    from covguard.bench.common import CHECKPOINT_KINDS, CIFAR_MODELS
    from covguard.bench.validation import PROTOCOLS
    from covguard.detectors.baselines import BASELINES

    parser.add_argument("--data", default=None, help="data root (default: $COVGUARD_DATA or ../shared/data)")
    parser.add_argument("--out", default=out, help=f"report folder (default: {out})")
    if models:
        parser.add_argument("--models", nargs="+", choices=CIFAR_MODELS, default=list(CIFAR_MODELS))
        parser.add_argument("--checkpoints", choices=CHECKPOINT_KINDS, default="original",
                            help="shared weights (original) or those fine-tuned on the JPEG training set (finetuned, checkpoints/)")
    if models and protocol:
        parser.add_argument("--protocol", choices=PROTOCOLS, default="fixed",
                            help="hyperparameters fixed in advance, chosen on ID-val vs OOD-val (OpenOOD v1.5), or both reported")
    if lineup:  # the detectors compared: baselines, and the covariance form of ours
        parser.add_argument("--baselines", nargs="*", choices=sorted(BASELINES), default=list(BASELINES))
        parser.add_argument("--covariance", choices=COVARIANCE_FORMS, default="full")
    parser.add_argument("--n-holdout", type=int, default=5000, help="training images held out to standardize layers")
    parser.add_argument("--max-train", type=int, default=None, help="cap on fit images (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_own_data(parser: argparse.ArgumentParser, *, ood: bool) -> None:
    """``--checkpoint``, ``--id-train`` / ``--id-test`` (and ``--ood``): the benchmark on your own model and sets
    (:mod:`covguard.bench.own_data`)."""
    own = parser.add_argument_group("own model and data (instead of the CIFAR-10 checkpoints and sets of --data)")
    own.add_argument("--checkpoint", action="append", metavar="NAME=PATH",
                     help="repeatable, replaces --models: NAME a model of covguard.models.MODELS (or with --model-file, a label), "
                          "PATH its weights (.pt, .pth, .th, .safetensors)")
    own.add_argument("--model-file", metavar="PATH.py:FACTORY",
                     help="with --checkpoint: FACTORY(**model args) in PATH.py builds the model (runs PATH.py: use only files you trust)")
    own.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="with --checkpoint: keyword argument of the model constructor or factory, repeatable (e.g. in_channels=3)")
    own.add_argument("--layers", nargs="+", default=None, help="with --checkpoint: patch-detector layers (default: the model's feature_layers)")
    own.add_argument("--feature-layer", default=None,
                     help="with --checkpoint: pooled penultimate layer of mds, rmds, knn, vim, react (default: avgpool; none: those skipped)")
    own.add_argument("--fc-layer", default=None, help="with --checkpoint: final nn.Linear of vim, react (default: the last nn.Linear)")
    own.add_argument("--id-train", metavar="PATH", help="folder or tar of <class>/<image> the detectors are fitted on (labels: sorted folder names)")
    own.add_argument("--id-test", metavar="PATH", help="folder or tar of <class>/<image> (the same class folders): in-distribution test set")
    if ood:
        own.add_argument("--ood", action="append", metavar="NAME=PATH",
                         help="repeatable, with --id-train/--id-test: folder or tar of OOD images at any depth (labels ignored)")
    own.add_argument("--image-size", type=int, default=None, metavar="S",
                     help="with --id-train: images resized as OpenOOD does, shorter side to S then center crop (default: 32)")
    parser.set_defaults(models=None)  # None: not given (--checkpoint refuses --models); the handler fills in CIFAR_MODELS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covguard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads of torch (default: torch's choice). On a machine shared with other busy processes, "
             "fewer threads than cores avoid OpenMP barrier stalls that can slow work 10x or more",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn digits and benchmark the detectors")
    demo.add_argument("--out", default="reports/demo", help="report folder (default: reports/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=30, help="classifier training epochs")
    demo.add_argument("--covariance", choices=COVARIANCE_FORMS, default="full")
    demo.add_argument("--eps", type=float, default=0.1, help="L-inf attack budget in [0, 1] pixel units")
    demo.add_argument("--max-test", type=int, default=None, help="cap on test images (quick runs)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=commands.demo)
    score = sub.add_parser(
        "score",
        help="score image files with a calibrated guard; write per-image score, flag and predicted class (CSV)",
        description=(
            "Score a folder (recursive), a tar archive or one image file. Each image is decoded with PIL, converted "
            "to the model's input channels (L for 1 channel, RGB for 3), resized to the detector's fitted input size "
            "with bilinear interpolation (no crop) and scaled to [0, 1]. Files that cannot be decoded get a row with "
            "flagged=True and the error."
        ),
    )
    score.add_argument("--detector", required=True, help="guard file written by Guard.save (safetensors)")
    _add_model(score)  # --model NAME | --model-file PATH.py:FACTORY, --weights, --model-arg
    score.add_argument("--images", required=True, help="folder, tar archive or image file")
    score.add_argument("--out", required=True, help="CSV to write: path, score, flagged, predicted_class, error")
    score.add_argument("--batch-size", type=int, default=64)
    score.add_argument("--workers", type=int, default=0, metavar="N",
                       help="decode images in N worker processes while the model runs (default 0: in the main process)")
    score.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    score.add_argument("--no-strict-model", action="store_true",
                       help="accept a model whose parameters differ from the fitted ones (warns)")
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.add_argument("--force", action="store_true", help="replace an existing --out (only when the run succeeds)")
    score.set_defaults(func=commands.score)

    bench = sub.add_parser("bench", help="reproduce a benchmark on real data").add_subparsers(dest="bench", required=True)
    adv = bench.add_parser("adversarial", help="adversarial-example detection on CIFAR-10 (FGSM, BIM, PGD, PGD-L2, IGM, mix)")
    _add_bench_common(adv, "results/adversarial")
    adv.add_argument("--attacks", nargs="+", choices=("fgsm", "bim", "pgd", "pgd_l2", "igm"),
                     default=["fgsm", "bim", "pgd", "pgd_l2", "igm"], help="a 'mix' set drawn from them is always added")
    adv.add_argument("--eps", type=float, default=8.0, help="L-inf budget in pixel levels /255 (default: 8)")
    adv.add_argument("--eps-l2", type=float, default=0.5, help="L2 budget of pgd_l2 in [0, 1] pixel units")
    adv.add_argument("--steps", type=int, default=10, help="iterations of PGD, PGD-L2 and IGM")
    adv.add_argument("--igm-scales", type=int, default=8, help="input scales per integrated gradient")
    adv.add_argument("--n-images", type=int, default=1000, help="clean test images drawn (seeded)")
    adv.add_argument("--sweep-eps", type=float, nargs="*", default=[], metavar="EPS",
                     help="also attack at these L-inf budgets in pixel levels /255 (e.g. 1 2 4 8 16)")
    adv.add_argument("--sweep-attacks", nargs="+", choices=("fgsm", "bim", "pgd", "igm"), default=["fgsm", "bim", "pgd"],
                     help="attacks run at every --sweep-eps budget")
    _add_own_data(adv, ood=False)
    adv.add_argument("--resume", action="store_true",
                     help="keep the checkpoints already in --out/results.json (same settings) and run the others")
    adv.set_defaults(func=commands.bench_adversarial)
    ood = bench.add_parser("ood", help="OOD detection on CIFAR-10: near CIFAR-100/TIN, far MNIST (OpenOOD v1.5 style)")
    _add_bench_common(ood, "results/ood")
    ood.add_argument("--max-eval", type=int, default=None, help="cap on images per evaluation set (seeded subset)")
    ood.add_argument("--n-noise", type=int, default=2000, help="images per synthetic noise set")
    ood.add_argument("--mixture", action="store_true", help="also score class_mahalanobis_mixture (slower)")
    ood.add_argument("--variants", action="store_true",
                     help="variant sweep: covariance forms, rank, aggregation, class scoring, with the ID-only selection rule")
    _add_own_data(ood, ood=True)
    ood.set_defaults(func=commands.bench_ood)
    finetune = sub.add_parser(
        "finetune", help="fine-tune a shared CIFAR-10 ResNet on the JPEG training set (crop + flip, SGD, cosine)"
    )
    finetune.add_argument("--model", required=True, choices=("resnet20", "resnet32", "resnet44"))
    finetune.add_argument("--data", default=None, help="data root (default: $COVGUARD_DATA or ../shared/data)")
    finetune.add_argument("--out", default=None, help="weights to write (default: checkpoints/<model>-jpeg.safetensors)")
    finetune.add_argument("--epochs", type=int, default=3)
    finetune.add_argument("--lr", type=float, default=0.01, help="peak SGD learning rate (cosine-decayed to 0)")
    finetune.add_argument("--batch-size", type=int, default=128)
    finetune.add_argument("--crop-padding", type=int, default=4, help="padding of the random crop (0: no crop)")
    finetune.add_argument("--max-train", type=int, default=None, help="cap on training images (quick runs)")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    finetune.add_argument("--force", action="store_true", help="overwrite an existing --out")
    finetune.add_argument("--no-progress", action="store_true", help="hide progress bars")
    finetune.set_defaults(func=commands.finetune)
    _add_shortcut(bench.add_parser("shortcut", help="shortcut-shift benchmark: a spurious marker learned, then moved or removed"))
    _add_suite(bench.add_parser("suite", help="one guard per checkpoint on every category: OOD, noise, blank, attacks, shortcut; fused detectors"))
    _add_frontier(bench.add_parser("frontier", help="quality (validation, near, far, attacks) vs scoring overhead per covariance form; the default"))
    _add_timing(bench.add_parser("timing", help="scoring overhead next to the bare forward, fit throughput, peak fit memory"))
    _add_throughput(bench.add_parser("throughput", help="covguard score end to end (--workers) next to the bare model, images/s and peak RSS"))
    _add_heatmap(sub.add_parser("heatmap", help="overlay per-patch distances of each layer on images (one PNG per image)"))
    _add_fit(sub.add_parser("fit", help="fit and calibrate a guard on a folder or tar of training images"))
    _add_export(sub.add_parser("export", help="export a model and its guard as one ONNX (or TorchScript) graph"))
    return parser


def _marker_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--marker must be HEIGHTxWIDTH in pixels (e.g. 3x8); got {text!r}") from None
    return height, width


def _add_shortcut(parser: argparse.ArgumentParser) -> None:
    from covguard.bench.common import CIFAR_MODELS
    from covguard.bench.shortcut import DATASETS, ShortcutConfig
    from covguard.data.shortcut import POSITIONS

    d = ShortcutConfig()
    _add_bench_common(parser, "results/shortcut-<dataset>", models=False, batch_size=d.batch_size)
    parser.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="digits (embedded, fast) or cifar10 (shared data)")
    parser.add_argument("--classes", nargs="+", default=[str(c) for c in d.classes], help="shortcut classes: indices or names")
    parser.add_argument("--p-marked", type=float, default=d.p_marked, help="marker probability on the shortcut classes")
    parser.add_argument("--p-other", type=float, default=d.p_other, help="marker probability on the other classes")
    parser.add_argument("--marker", type=_marker_size, default=None, metavar="HxW",
                        help="marker size in pixels (default: 3x8 digits, 4x12 CIFAR-10)")
    parser.add_argument("--position", choices=POSITIONS, default=d.position)
    parser.add_argument("--epochs", type=int, default=None, help="training (digits: 30) or fine-tuning (CIFAR-10: 3) epochs")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (digits: 3e-3 Adam; CIFAR-10: 0.01 SGD)")
    parser.add_argument("--model", default=d.model, choices=CIFAR_MODELS, help="CIFAR-10 checkpoint")
    parser.add_argument("--max-finetune", type=int, default=None, help="CIFAR-10: cap on fine-tuning images")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images (seeded subset)")
    parser.add_argument("--layers", nargs="+", default=None, help="tapped layers (default: dataset's)")
    parser.add_argument("--n-heatmaps", type=int, default=d.n_heatmaps, help="fooled (c) images drawn as heatmaps")
    parser.set_defaults(func=commands.bench_shortcut)


def _add_suite(parser: argparse.ArgumentParser) -> None:
    from covguard.bench.suite_config import SuiteConfig

    d = SuiteConfig()
    _add_bench_common(parser, "results/suite", protocol=False)  # members and settings fixed in advance
    parser.add_argument("--n-images", type=int, default=d.n_images, help="test images drawn (seeded) = images per OOD, noise, blank set")
    parser.add_argument("--n-calibration", type=int, default=d.n_calibration,
                        help="training images held out of fit and holdout: the fused p-values' calibration")
    parser.add_argument("--mixture", action="store_true", help="also score class_mahalanobis_mixture (slower)")
    parser.add_argument("--attacks", nargs="+", choices=("fgsm", "bim", "pgd", "pgd_l2", "igm"), default=list(d.attacks))
    parser.add_argument("--eps", type=float, default=d.eps * 255, help="L-inf budget in pixel levels /255 (default: 8)")
    parser.add_argument("--small-eps", type=float, default=d.small_eps * 255, help="second L-inf budget /255 (default: 2)")
    parser.add_argument("--small-eps-attacks", nargs="*", choices=("fgsm", "bim", "pgd", "igm"), default=list(d.small_eps_attacks))
    parser.add_argument("--eps-l2", type=float, default=d.eps_l2, help="L2 budget of pgd_l2 in [0, 1] pixel units")
    parser.add_argument("--steps", type=int, default=d.steps, help="iterations of PGD, PGD-L2 and IGM")
    parser.add_argument("--igm-scales", type=int, default=d.igm_scales, help="input scales per integrated gradient")
    parser.add_argument("--shortcut", action="store_true",
                        help="also fine-tune and score the shortcut model (bench shortcut's CIFAR-10 recipe; ~30 min more)")
    parser.add_argument("--shortcut-model", choices=("resnet20", "resnet32", "resnet44"), default=d.shortcut_model)
    parser.add_argument("--shortcut-max-finetune", type=int, default=None, help="cap on the shortcut model's fine-tuning images")
    parser.add_argument("--shortcut-max-test", type=int, default=None, help="cap on the shortcut model's test images")
    parser.add_argument("--timing-images", type=int, default=d.timing_images, help="images per timed scoring call")
    parser.add_argument("--timing-repeats", type=int, default=d.timing_repeats)
    parser.add_argument("--cache-dir", default=None, help="cache of scores and attacks (default: $COVGUARD_CACHE/suite or ~/.cache/covguard/suite)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.set_defaults(func=commands.bench_suite)


def _add_frontier(parser: argparse.ArgumentParser) -> None:
    from covguard.bench.frontier import FrontierConfig

    d = FrontierConfig()
    _add_bench_common(parser, "results/frontier", protocol=False, lineup=False)  # every form of ours, no baseline
    parser.set_defaults(checkpoints=d.checkpoints, models=list(d.models))
    parser.add_argument("--timing-models", nargs="+", choices=("resnet20", "resnet18_32x32"), default=list(d.timing_models),
                        help="models timed (resnet20: the fitted checkpoint; resnet18_32x32: random init)")
    parser.add_argument("--n-images", type=int, default=d.n_images, help="seeded images per test set")
    parser.add_argument("--fit-positions", type=float, default=d.fit_positions, help="share of patch positions of the subsampled fits")
    parser.add_argument("--sweep-positions", nargs="+", type=float, default=list(d.sweep_positions),
                        help="smaller shares of positions fitted for the default form")
    parser.add_argument("--attacks", nargs="+", choices=("fgsm", "bim", "pgd", "igm"), default=list(d.attacks))
    parser.add_argument("--repeats", type=int, default=d.repeats, help="interleaved timing repeats (medians)")
    parser.add_argument("--cache-dir", default=None, help="cache of the attacks (default: $COVGUARD_CACHE/suite or ~/.cache/covguard/suite)")
    parser.add_argument("--resume", action="store_true", help="reuse the quality measurements of the report in --out (same settings)")
    parser.set_defaults(func=commands.bench_frontier)


def _add_timing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports/timing", help="report folder (default: reports/timing)")
    parser.add_argument("--models", nargs="+", default=["resnet18_32x32", "resnet20"], help="benchmarked models")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64, 256], help="scoring batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per measurement (medians)")
    parser.add_argument("--quick", action="store_true", help="reduced run: full, diag, lowrank-64; smaller fit and memory runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--detectors", nargs="+", default=None, help="restrict to configurations such as simple/lowrank-64 class-top1/full")
    parser.add_argument("--nchw", action="store_true", help="run the model in contiguous (NCHW) layout instead of channels_last")
    parser.add_argument("--no-fit", action="store_true", help="skip the fit-throughput measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-images", nargs=2, type=int, default=None, help="data sizes of the memory runs (default 1000 10000)")
    parser.add_argument("--memory-classes", nargs="+", type=int, default=[10, 100], help="class counts of the class-statistics memory runs")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=commands.bench_timing)


def _add_throughput(parser: argparse.ArgumentParser) -> None:
    from covguard.bench.throughput import ThroughputConfig

    d = ThroughputConfig()
    parser.add_argument("--out", default="reports/throughput", help="report folder (default: reports/throughput)")
    parser.add_argument("--n-images", type=int, default=d.n_images, help="synthetic PNGs written to a temporary folder")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="side of the synthetic images (pixels)")
    parser.add_argument("--images", default=None, help="score this folder or tar instead of synthetic images")
    parser.add_argument("--model", default=d.model, help="model name in covguard.models.MODELS (random weights without --detector)")
    parser.add_argument("--detector", default=None, help="a saved guard (with --weights); default: fit one here")
    parser.add_argument("--weights", default=None, help="weights of --model (with --detector)")
    parser.add_argument("--workers", type=int, nargs="+", default=list(d.workers), help="--workers values of the score runs")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--device", default=d.device, help="torch device (default: cpu)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-progress", action="store_true", help="hide the score runs' progress bars")
    parser.set_defaults(func=commands.bench_throughput)


def _add_heatmap(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", required=True, help="detector or guard file (safetensors) written by save")
    parser.add_argument("--model", required=True, help="model name in covguard.models.MODELS")
    parser.add_argument("--weights", required=True, help="checkpoint of the model (.pt, .pth, .th, .safetensors)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument of the model constructor, repeatable (e.g. num_classes=100)")
    parser.add_argument("--images", required=True, help="folder (recursive), tar archive or image file")
    parser.add_argument("--out", default="heatmaps", help="folder for the PNGs and report.html (default: heatmaps)")
    parser.add_argument("--layers", nargs="+", default=None, help="layers to draw (default: all fitted layers)")
    parser.add_argument("--max-images", type=int, default=32, help="draw at most this many images (default: 32)")
    parser.add_argument("--alpha", type=float, default=0.55, help="opacity of the overlay (default: 0.55)")
    parser.add_argument("--cmap", default="inferno", help="matplotlib colormap (default: inferno)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-strict-model", action="store_true",
                        help="accept a model whose parameters differ from the fitted ones (warns)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=commands.heatmap)


def _add_model(parser: argparse.ArgumentParser) -> None:
    """``--model`` | ``--model-file``, ``--weights``, ``--model-arg``: how the CLI names a classifier."""
    from covguard.models import MODELS

    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help=f"model name in covguard.models.MODELS: {', '.join(MODELS)}")
    which.add_argument(
        "--model-file", metavar="PATH.py:FACTORY",
        help="your own model: FACTORY(**model args) in PATH.py returns the nn.Module. This imports and runs "
             "PATH.py as Python code: use only files you trust",
    )
    parser.add_argument("--weights", required=True, help="trained weights of the model (.pt, .pth, .th, .safetensors)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument of the model constructor or factory, repeatable (e.g. num_classes=100)")


def _add_fit(parser: argparse.ArgumentParser) -> None:
    from covguard.detectors.layer_fusion import FUSIONS
    from covguard.fitting import DETECTOR_KINDS, FitConfig

    d = FitConfig()
    _add_model(parser)
    parser.add_argument("--train", required=True, metavar="PATH",
                        help="folder or tar of <class>/<image> (labels: sorted folder names); any images for --detector simple")
    parser.add_argument("--out", required=True, help="guard file to write (safetensors)")
    parser.add_argument("--detector", choices=sorted(DETECTOR_KINDS), default=d.detector,
                        help="class: class-conditional Gaussians (needs labels); simple: one Gaussian per layer")
    parser.add_argument("--layers", nargs="+", default=None, help="modules to tap (default: the model's feature_layers)")
    parser.add_argument("--covariance", choices=COVARIANCE_FORMS, default=d.covariance)
    parser.add_argument("--rank", type=int, default=d.rank, help="eigenpairs kept by --covariance lowrank")
    parser.add_argument("--fit-positions", type=float, default=d.fit_positions,
                        help="share of each fit image's patch positions accumulated (1: exact statistics, for small data)")
    parser.add_argument("--fusion", choices=FUSIONS, default=d.fusion,
                        help="layer fusion: gaussian (default; two-sided, also flags too-typical inputs such as blank frames), sum, max")
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
    parser.set_defaults(func=commands.fit)


def _add_export(parser: argparse.ArgumentParser) -> None:
    from covguard.export import DEFAULT_OPSET, EXPORT_FORMATS

    parser.add_argument("--detector", required=True, help="guard file written by covguard fit or Guard.save (safetensors)")
    _add_model(parser)
    parser.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="onnx")
    parser.add_argument("--out", required=True, help="file to write (e.g. guarded.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset version (default: {DEFAULT_OPSET})")
    parser.add_argument("--device", default="cpu", help="torch device to trace on (default: cpu)")
    parser.add_argument("--no-strict-model", action="store_true",
                        help="accept a model whose parameters differ from the fitted ones (warns)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.set_defaults(func=commands.export)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Errors in its inputs (``ValueError``, ``OSError``: bad files, options,
    devices; ``ImportError``: a missing optional dependency) are printed on one line of stderr with exit status 2, for every command; with
    ``-v`` the traceback is logged too. Ctrl-C exits with status 130."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"covguard: --threads must be >= 1; got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    command = " ".join(str(v) for v in (args.command, getattr(args, "bench", None)) if v)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:
        logging.getLogger(__name__).info("covguard %s failed", command, exc_info=True)
        message = str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror or err}: {err.filename!r}"
        print(f"covguard {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"covguard {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
