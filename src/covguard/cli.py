"""Command-line interface: ``covguard demo``, ``score``, ``heatmap``, ``bench adversarial|ood|shortcut|timing``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from covguard.covariance import COVARIANCE_FORMS

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from covguard.bench.demo import DemoConfig, render_markdown, run_demo

    config = DemoConfig(
        seed=args.seed,
        epochs=args.epochs,
        covariance=args.covariance,
        attack_eps=args.eps,
        max_test=args.max_test,
        progress=not args.no_progress,
    )
    tic = time.perf_counter()
    result = run_demo(args.out, config)
    print(render_markdown(result))
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


def _score(args: argparse.Namespace) -> int:
    from covguard.scoring_cli import run_score

    return run_score(args)


def _data_root(value: str | None) -> Path:
    from covguard.data.registry import data_root

    root = Path(value) if value else data_root()
    if root is None or not root.is_dir():
        raise SystemExit(f"covguard: --data must be a folder with the benchmark data; got {value!r} (and no COVGUARD_DATA)")
    return root


def _bench_adversarial(args: argparse.Namespace) -> int:
    from covguard.bench.adversarial import AdversarialConfig, run_adversarial

    config = AdversarialConfig(
        models=tuple(args.models), attacks=tuple(args.attacks), eps=args.eps / 255, eps_l2=args.eps_l2,
        steps=args.steps, igm_scales=args.igm_scales, n_images=args.n_images, n_holdout=args.n_holdout,
        max_train=args.max_train, covariance=args.covariance, baselines=tuple(args.baselines), seed=args.seed,
        batch_size=args.batch_size, device=args.device, checkpoints=args.checkpoints, progress=not args.no_progress,
        sweep_eps=tuple(e / 255 for e in args.sweep_eps), sweep_attacks=tuple(args.sweep_attacks),
    )
    tic = time.perf_counter()
    run_adversarial(_data_root(args.data), args.out, config, resume=args.resume)
    print((Path(args.out) / "results.md").read_text())
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


def _bench_ood(args: argparse.Namespace) -> int:
    from covguard.bench.ood import OODConfig, run_ood

    config = OODConfig(
        models=tuple(args.models), n_holdout=args.n_holdout, max_train=args.max_train, max_eval=args.max_eval,
        n_noise=args.n_noise, covariance=args.covariance, mixture=args.mixture, variants=args.variants, baselines=tuple(args.baselines), seed=args.seed,
        batch_size=args.batch_size, device=args.device, checkpoints=args.checkpoints, progress=not args.no_progress,
    )
    tic = time.perf_counter()
    run_ood(_data_root(args.data), args.out, config)
    print((Path(args.out) / "results.md").read_text())
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


def _bench_shortcut(args: argparse.Namespace) -> int:
    """Run ``covguard bench shortcut``; bad arguments go to stderr with exit status 2."""
    from covguard.bench.shortcut import ShortcutConfig, run_shortcut
    from covguard.bench.shortcut_report import render_markdown

    out = args.out.replace("<dataset>", args.dataset)
    config = ShortcutConfig(
        dataset=args.dataset, classes=tuple(args.classes), p_marked=args.p_marked, p_other=args.p_other, marker_size=args.marker,
        position=args.position, seed=args.seed, epochs=args.epochs, lr=args.lr, data=args.data, model=args.model,
        max_finetune=args.max_finetune, n_holdout=args.n_holdout, max_train=args.max_train, max_test=args.max_test,
        layers=None if args.layers is None else tuple(args.layers), covariance=args.covariance, baselines=tuple(args.baselines),
        n_heatmaps=args.n_heatmaps, batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
    )
    tic = time.perf_counter()
    try:
        result = run_shortcut(out, config)
    except (ValueError, FileNotFoundError) as err:
        print(f"covguard bench shortcut: error: {err}", file=sys.stderr)
        return 2
    print(render_markdown(result.to_dict()))
    print(f"Report written to {out} ({Path(out) / 'report.html'}) in {time.perf_counter() - tic:.1f} s")
    return 0


def _bench_timing(args: argparse.Namespace) -> int:
    from covguard.bench.timing import render_markdown, run_timing

    result = run_timing(
        args.out, models=tuple(args.models), batch_sizes=tuple(args.batch_sizes), repeats=args.repeats, quick=args.quick,
        device=args.device, detectors=args.detectors, channels_last=not args.nchw, fit=not args.no_fit, memory=not args.no_memory,
        memory_images=args.memory_images, memory_classes=tuple(args.memory_classes), progress=not args.no_progress,
    )
    print(render_markdown(result))
    print(f"Report written to {args.out}")
    return 0


def _heatmap(args: argparse.Namespace) -> int:
    """Run ``covguard heatmap``: errors in the inputs go to stderr with exit status 2."""
    from covguard.heatmap_report import write_heatmap_report
    from covguard.models import load_model
    from covguard.persistence import load

    try:
        model = load_model(args.model, args.weights, model_args=args.model_arg, device=args.device)
        report = write_heatmap_report(
            load(args.detector, model, strict_model=not args.no_strict_model), args.images, args.out, layers=args.layers,
            max_images=args.max_images, alpha=args.alpha, cmap=args.cmap, batch_size=args.batch_size, progress=not args.no_progress,
            description=f"Detector `{args.detector}` on model `{args.model}` (`{args.weights}`)",
        )
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"covguard heatmap: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(report.figures)} heatmaps ({len(report.failed)} images could not be decoded) and {report.page}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from covguard.bench.common import finetuned_path
    from covguard.bench.finetune import FinetuneConfig, finetune_checkpoint

    config = FinetuneConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, crop_padding=args.crop_padding, seed=args.seed,
        max_train=args.max_train, device=args.device, progress=not args.no_progress,
    )
    out = Path(args.out) if args.out else finetuned_path(args.model)
    try:
        log = finetune_checkpoint(args.model, _data_root(args.data), out, config, force=args.force)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"covguard finetune: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.model}: JPEG test accuracy {log['jpeg_test_accuracy_before']:.4f} -> {log['jpeg_test_accuracy_after']:.4f} "
        f"after {config.epochs} epochs ({log['train_seconds']:.0f} s); wrote {out} and {out.with_suffix('.json')}"
    )
    return 0


def _add_bench_common(parser: argparse.ArgumentParser, out: str, *, models: bool = True, batch_size: int = 256) -> None:
    from covguard.bench.common import CHECKPOINT_KINDS, CIFAR_MODELS
    from covguard.detectors.baselines import BASELINES

    parser.add_argument("--data", default=None, help="data root (default: $COVGUARD_DATA or ../shared/data)")
    parser.add_argument("--out", default=out, help=f"report folder (default: {out})")
    if models:
        parser.add_argument("--models", nargs="+", choices=CIFAR_MODELS, default=list(CIFAR_MODELS))
        parser.add_argument("--checkpoints", choices=CHECKPOINT_KINDS, default="original",
                            help="shared weights (original) or those fine-tuned on the JPEG training set (finetuned, checkpoints/)")
    parser.add_argument("--baselines", nargs="*", choices=sorted(BASELINES), default=list(BASELINES))
    parser.add_argument("--covariance", choices=COVARIANCE_FORMS, default="full")
    parser.add_argument("--n-holdout", type=int, default=5000, help="training images held out to standardize layers")
    parser.add_argument("--max-train", type=int, default=None, help="cap on fit images (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


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
    demo.set_defaults(func=_demo)
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
    score.add_argument("--model", required=True, help="model name in covguard.models.MODELS")
    score.add_argument("--weights", required=True, help="checkpoint of the model (.pt, .pth, .th, .safetensors)")
    score.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument of the model constructor, repeatable (e.g. num_classes=100)")
    score.add_argument("--images", required=True, help="folder, tar archive or image file")
    score.add_argument("--out", required=True, help="CSV to write: path, score, flagged, predicted_class, error")
    score.add_argument("--batch-size", type=int, default=64)
    score.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    score.add_argument("--no-strict-model", action="store_true",
                       help="accept a model whose parameters differ from the fitted ones (warns)")
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.add_argument("--force", action="store_true", help="replace an existing --out (only when the run succeeds)")
    score.set_defaults(func=_score)

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
    adv.add_argument("--resume", action="store_true",
                     help="keep the checkpoints already in --out/results.json (same settings) and run the others")
    adv.set_defaults(func=_bench_adversarial)
    ood = bench.add_parser("ood", help="OOD detection on CIFAR-10: near CIFAR-100/TIN, far MNIST (OpenOOD v1.5 style)")
    _add_bench_common(ood, "results/ood")
    ood.add_argument("--max-eval", type=int, default=None, help="cap on images per evaluation set (seeded subset)")
    ood.add_argument("--n-noise", type=int, default=2000, help="images per synthetic noise set")
    ood.add_argument("--mixture", action="store_true", help="also score class_mahalanobis_mixture (slower)")
    ood.add_argument("--variants", action="store_true",
                     help="variant sweep: covariance forms, rank, aggregation, class scoring, with the ID-only selection rule")
    ood.set_defaults(func=_bench_ood)
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
    finetune.set_defaults(func=_finetune)
    _add_shortcut(bench.add_parser("shortcut", help="shortcut-shift benchmark: a spurious marker learned, then moved or removed"))
    _add_timing(bench.add_parser("timing", help="scoring overhead next to the bare forward, fit throughput, peak fit memory"))
    _add_heatmap(sub.add_parser("heatmap", help="overlay per-patch distances of each layer on images (one PNG per image)"))
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
    parser.set_defaults(func=_bench_shortcut)


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
    parser.set_defaults(func=_bench_timing)


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
    parser.set_defaults(func=_heatmap)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Errors in its inputs (``ValueError``, ``OSError``: bad files, options,
    devices) are printed on one line of stderr with exit status 2, for every command; with
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
    except (ValueError, OSError) as err:
        logging.getLogger(__name__).info("covguard %s failed", command, exc_info=True)
        message = str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror or err}: {err.filename!r}"
        print(f"covguard {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"covguard {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
