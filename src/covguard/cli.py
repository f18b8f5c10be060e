"""Command-line interface: ``covguard demo``, ``score``, ``heatmap``, ``bench adversarial|ood|shortcut|timing``."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
    """Run ``covguard score``; input and model errors are reported on stderr with exit status 2."""
    try:
        return _score_images(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"covguard score: error: {err}", file=sys.stderr)
        return 2


def _score_images(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from covguard.guard import decode_image, iter_images, load_guard
    from covguard.models import load_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    model = load_model(args.model, args.weights, model_args=args.model_arg, device=args.device)
    guard = load_guard(args.detector, model, strict_model=not args.no_strict_model)
    channels, height, width = guard.detector.input_shape_
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    total, images = iter_images(args.images)
    if total == 0:
        raise ValueError(f"--images {args.images!r} holds no image files (suffixes: .png, .jpg, ...)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"scored": 0, "flagged": 0, "failed": 0}

    def flush(writer: csv.writer, names: list[str], xs: list[torch.Tensor]) -> None:
        if not names:
            return
        result = guard(torch.stack(xs).to(dtype))  # (n, C, H, W)
        for name, s, f, p in zip(names, result.scores.tolist(), result.flagged.tolist(), result.predictions.tolist()):
            writer.writerow([name, repr(float(s)), f, p, ""])
        counts["scored"] += len(names)
        counts["flagged"] += int(result.flagged.sum())
        names.clear()
        xs.clear()

    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "flagged", "predicted_class", "error"])
        names: list[str] = []
        xs: list[torch.Tensor] = []
        for name, data in tqdm(images, total=total, desc="score", unit="img", disable=args.no_progress):
            try:
                xs.append(decode_image(data, channels=channels, size=(height, width)))
            except ValueError as err:
                writer.writerow([name, "", True, "", str(err)])
                counts["failed"] += 1
                continue
            names.append(name)
            if len(names) == args.batch_size:
                flush(writer, names, xs)
        flush(writer, names, xs)
    threshold = guard.threshold_
    print(
        f"scored {counts['scored']} images ({counts['failed']} could not be decoded): {counts['flagged']} flagged "
        f"above threshold {threshold:.6g} (calibrated for TPR {guard.calibration_.tpr:.2f}); wrote {out}"
    )
    return 0


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
        protocol=args.protocol,
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
        protocol=args.protocol,
    )
    tic = time.perf_counter()
    run_ood(_data_root(args.data), args.out, config)
    print((Path(args.out) / "results.md").read_text())
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
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


def _add_bench_common(parser: argparse.ArgumentParser, out: str) -> None:
    from covguard.bench.common import CHECKPOINT_KINDS, CIFAR_MODELS
    from covguard.detectors.baselines import BASELINES

    parser.add_argument("--data", default=None, help="data root (default: $COVGUARD_DATA or ../shared/data)")
    parser.add_argument("--out", default=out, help=f"report folder (default: {out})")
    parser.add_argument("--models", nargs="+", choices=CIFAR_MODELS, default=list(CIFAR_MODELS))
    parser.add_argument("--checkpoints", choices=CHECKPOINT_KINDS, default="original",
                        help="shared weights (original) or those fine-tuned on the JPEG training set (finetuned, checkpoints/)")
    parser.add_argument("--baselines", nargs="*", choices=sorted(BASELINES), default=list(BASELINES))
    parser.add_argument("--covariance", choices=("full", "diag", "lowrank"), default="full")
    parser.add_argument("--n-holdout", type=int, default=5000, help="training images held out to standardize layers")
    parser.add_argument("--max-train", type=int, default=None, help="cap on fit images (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from covguard.bench.validation import PROTOCOLS

    parser.add_argument("--protocol", choices=PROTOCOLS, default="fixed",
                        help="hyperparameters fixed in advance, chosen on ID-val vs OOD-val (OpenOOD v1.5), or both reported")


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
    demo.add_argument("--covariance", choices=("full", "diag", "lowrank"), default="full")
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
    from covguard.bench.shortcut import add_shortcut_arguments, run_shortcut_cli
    from covguard.heatmap import add_heatmap_arguments, run_heatmap_cli

    shortcut = bench.add_parser("shortcut", help="shortcut-shift benchmark: a spurious marker learned, then moved or removed")
    add_shortcut_arguments(shortcut).set_defaults(func=run_shortcut_cli)
    from covguard.bench.timing import add_timing_arguments
    from covguard.bench.timing import main as run_timing_cli

    timing = bench.add_parser("timing", help="scoring overhead next to the bare forward, fit throughput, peak fit memory")
    add_timing_arguments(timing).set_defaults(func=run_timing_cli)
    heatmap = sub.add_parser("heatmap", help="overlay per-patch distances of each layer on images (one PNG per image)")
    add_heatmap_arguments(heatmap).set_defaults(func=run_heatmap_cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"covguard: --threads must be >= 1; got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
