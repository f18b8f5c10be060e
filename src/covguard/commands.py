"""What each ``covguard`` command does with its parsed arguments (the parsers live in :mod:`covguard.cli`).

Errors in the inputs propagate as ``ValueError`` / ``OSError`` to the error boundary of
:func:`covguard.cli.main`, which prints them on one line with exit status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "bench_adversarial", "bench_ood", "bench_shortcut", "bench_suite", "bench_throughput", "bench_timing", "demo", "export",
    "finetune", "fit", "heatmap", "score",
]


def score(args: argparse.Namespace) -> int:
    """Run ``covguard score`` (:mod:`covguard.scoring_cli`)."""
    from covguard.scoring_cli import run_score

    return run_score(args)


def demo(args: argparse.Namespace) -> int:
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


def _data_root(value: str | None) -> Path:
    from covguard.data.registry import data_root

    root = Path(value) if value else data_root()
    if root is None or not root.is_dir():
        raise SystemExit(f"covguard: --data must be a folder with the benchmark data; got {value!r} (and no COVGUARD_DATA)")
    return root


def _own_sources(args: argparse.Namespace, *, ood: bool) -> tuple[tuple[str, ...], object, object, Path | None]:
    """(checkpoint names, model source or None, data source or None, data root or None) from the
    ``--checkpoint`` / ``--id-train`` / ``--id-test`` / ``--ood`` options (:mod:`covguard.bench.own_data`),
    each inconsistency refused with a message naming the option."""
    from covguard.bench.common import CIFAR_MODELS
    from covguard.bench.ood import SYNTHETIC
    from covguard.bench.own_data import OwnCheckpoints, OwnSets, parse_named_paths

    checkpoints = parse_named_paths(args.checkpoint, "--checkpoint")
    if checkpoints and args.models:
        raise ValueError("--checkpoint replaces --models: give one of them")
    if checkpoints and args.checkpoints != "original":
        raise ValueError("--checkpoints finetuned picks the CIFAR ResNets' weights; --checkpoint names its own weights")
    for option, value in (("--model-file", args.model_file), ("--model-arg", args.model_arg), ("--layers", args.layers),
                          ("--feature-layer", args.feature_layer), ("--fc-layer", args.fc_layer)):
        if value and not checkpoints:
            raise ValueError(f"{option} describes the model of --checkpoint NAME=PATH; give --checkpoint with it")
    ood_sets = parse_named_paths(getattr(args, "ood", None), "--ood")
    if clash := sorted(set(ood_sets) & set(SYNTHETIC)):
        raise ValueError(f"--ood: the names {clash} are taken by the noise sets; choose other names")
    own_data = args.id_train is not None or args.id_test is not None or bool(ood_sets)
    if own_data:
        for option, value in (("--id-train", args.id_train), ("--id-test", args.id_test)):
            if value is None:
                raise ValueError(f"{option} is required with {'--id-test' if option == '--id-train' else '--id-train'}"
                                 f"{' and --ood' if ood else ''}: the benchmark runs on your sets or on the default ones")
        if ood and not ood_sets:
            raise ValueError("--ood NAME=PATH is required (at least one) with --id-train / --id-test")
    elif args.image_size is not None:
        raise ValueError("--image-size resizes the images of --id-train / --id-test: give them with it")
    size = 32 if args.image_size is None else args.image_size
    data = OwnSets(Path(args.id_train), Path(args.id_test), ood_sets, size).check() if own_data else None
    models = None
    if checkpoints:
        models = OwnCheckpoints(checkpoints, args.model_file, tuple(args.model_arg), None if args.layers is None else tuple(args.layers),
                                args.feature_layer, args.fc_layer, size, tuple(args.baselines)).check()
    root = None if models is not None and data is not None else _data_root(args.data)
    return tuple(checkpoints) or tuple(args.models or CIFAR_MODELS), models, data, root


def bench_adversarial(args: argparse.Namespace) -> int:
    from covguard.bench.adversarial import AdversarialConfig, run_adversarial

    names, models, data, root = _own_sources(args, ood=False)
    config = AdversarialConfig(
        models=names, attacks=tuple(args.attacks), eps=args.eps / 255, eps_l2=args.eps_l2,
        steps=args.steps, igm_scales=args.igm_scales, n_images=args.n_images, n_holdout=args.n_holdout,
        max_train=args.max_train, covariance=args.covariance, baselines=tuple(args.baselines), seed=args.seed,
        batch_size=args.batch_size, device=args.device, checkpoints=args.checkpoints, progress=not args.no_progress,
        sweep_eps=tuple(e / 255 for e in args.sweep_eps), sweep_attacks=tuple(args.sweep_attacks),
        protocol=args.protocol,
    )
    tic = time.perf_counter()
    run_adversarial(root, args.out, config, resume=args.resume, models=models, data=data)
    print((Path(args.out) / "results.md").read_text())
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


def bench_ood(args: argparse.Namespace) -> int:
    from covguard.bench.ood import OODConfig, run_ood

    names, models, data, root = _own_sources(args, ood=True)
    config = OODConfig(
        models=names, n_holdout=args.n_holdout, max_train=args.max_train, max_eval=args.max_eval,
        n_noise=args.n_noise, covariance=args.covariance, mixture=args.mixture, variants=args.variants, baselines=tuple(args.baselines), seed=args.seed,
        batch_size=args.batch_size, device=args.device, checkpoints=args.checkpoints, progress=not args.no_progress,
        protocol=args.protocol,
    )
    tic = time.perf_counter()
    run_ood(root, args.out, config, models=models, data=data)
    print((Path(args.out) / "results.md").read_text())
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


def bench_shortcut(args: argparse.Namespace) -> int:
    """Run ``covguard bench shortcut``."""
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
    result = run_shortcut(out, config)
    print(render_markdown(result.to_dict()))
    print(f"Report written to {out} ({Path(out) / 'report.html'}) in {time.perf_counter() - tic:.1f} s")
    return 0


def bench_suite(args: argparse.Namespace) -> int:
    """Run ``covguard bench suite``."""
    from covguard.bench.suite import run_suite
    from covguard.bench.suite_config import SuiteConfig

    config = SuiteConfig(
        models=tuple(args.models), checkpoints=args.checkpoints, n_images=args.n_images, n_holdout=args.n_holdout,
        n_calibration=args.n_calibration, max_train=args.max_train, covariance=args.covariance, mixture=args.mixture,
        baselines=tuple(args.baselines), attacks=tuple(args.attacks), eps=args.eps / 255, small_eps=args.small_eps / 255,
        small_eps_attacks=tuple(args.small_eps_attacks), eps_l2=args.eps_l2, steps=args.steps, igm_scales=args.igm_scales,
        shortcut=args.shortcut, shortcut_model=args.shortcut_model, shortcut_max_finetune=args.shortcut_max_finetune,
        shortcut_max_test=args.shortcut_max_test, seed=args.seed, batch_size=args.batch_size, device=args.device,
        timing_images=args.timing_images, timing_repeats=args.timing_repeats, cache=not args.no_cache,
        cache_dir=args.cache_dir, progress=not args.no_progress,
    )
    tic = time.perf_counter()
    run_suite(_data_root(args.data), args.out, config)
    print((Path(args.out) / "results.md").read_text())
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


def bench_frontier(args: argparse.Namespace) -> int:
    """Run ``covguard bench frontier`` (:mod:`covguard.bench.frontier`)."""
    from covguard.bench.frontier import FrontierConfig, run_frontier

    config = FrontierConfig(
        models=tuple(args.models), checkpoints=args.checkpoints, timing_models=tuple(args.timing_models), n_images=args.n_images,
        n_holdout=args.n_holdout, max_train=args.max_train, fit_positions=args.fit_positions,
        sweep_positions=tuple(args.sweep_positions), attacks=tuple(args.attacks), repeats=args.repeats, seed=args.seed,
        batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir, progress=not args.no_progress,
    )
    tic = time.perf_counter()
    run_frontier(_data_root(args.data), args.out, config, resume=args.resume)
    print((Path(args.out) / "results.md").read_text())
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


def bench_timing(args: argparse.Namespace) -> int:
    from covguard.bench.timing import render_markdown, run_timing

    result = run_timing(
        args.out, models=tuple(args.models), batch_sizes=tuple(args.batch_sizes), repeats=args.repeats, quick=args.quick,
        device=args.device, detectors=args.detectors, channels_last=not args.nchw, fit=not args.no_fit, memory=not args.no_memory,
        memory_images=args.memory_images, memory_classes=tuple(args.memory_classes), progress=not args.no_progress,
    )
    print(render_markdown(result))
    print(f"Report written to {args.out}")
    return 0


def bench_throughput(args: argparse.Namespace) -> int:
    """Run ``covguard bench throughput`` (:mod:`covguard.bench.throughput`)."""
    from covguard.bench.throughput import ThroughputConfig, measure, render_markdown

    if args.n_images < 2 or args.batch_size < 1 or min(args.workers) < 0:
        raise ValueError(
            f"--n-images must be >= 2, --batch-size >= 1 and --workers >= 0; got {args.n_images}, {args.batch_size}, {args.workers}"
        )
    config = ThroughputConfig(
        n_images=args.n_images, image_size=args.image_size, images=args.images, model=args.model, weights=args.weights,
        detector=args.detector, workers=tuple(args.workers), batch_size=args.batch_size, device=args.device, seed=args.seed,
    )
    result = measure(config, args.out, progress=not args.no_progress)
    print(render_markdown(result))
    print(f"Report written to {args.out}")
    return 0


def heatmap(args: argparse.Namespace) -> int:
    """Run ``covguard heatmap``."""
    from covguard.heatmap_report import write_heatmap_report
    from covguard.models import load_model
    from covguard.persistence import load

    model = load_model(args.model, args.weights, model_args=args.model_arg, device=args.device)
    report = write_heatmap_report(
        load(args.detector, model, strict_model=not args.no_strict_model), args.images, args.out, layers=args.layers,
        max_images=args.max_images, alpha=args.alpha, cmap=args.cmap, batch_size=args.batch_size, progress=not args.no_progress,
        description=f"Detector `{args.detector}` on model `{args.model}` (`{args.weights}`)",
    )
    print(f"wrote {len(report.figures)} heatmaps ({len(report.failed)} images could not be decoded) and {report.page}")
    return 0


def finetune(args: argparse.Namespace) -> int:
    from covguard.bench.common import finetuned_path
    from covguard.bench.finetune import FinetuneConfig, finetune_checkpoint

    config = FinetuneConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, crop_padding=args.crop_padding, seed=args.seed,
        max_train=args.max_train, device=args.device, progress=not args.no_progress,
    )
    out = Path(args.out) if args.out else finetuned_path(args.model)
    log = finetune_checkpoint(args.model, _data_root(args.data), out, config, force=args.force)
    print(
        f"{args.model}: JPEG test accuracy {log['jpeg_test_accuracy_before']:.4f} -> {log['jpeg_test_accuracy_after']:.4f} "
        f"after {config.epochs} epochs ({log['train_seconds']:.0f} s); wrote {out} and {out.with_suffix('.json')}"
    )
    return 0


def fit(args: argparse.Namespace) -> int:
    """Run ``covguard fit``: fit and calibrate a guard on a folder or tar of training images."""
    from covguard.data.training_images import read_training_images
    from covguard.fitting import FitConfig, fit_guard, input_channels

    out = _new_output(args.out, args.force)
    config = FitConfig(
        detector=args.detector, layers=None if args.layers is None else tuple(args.layers), covariance=args.covariance,
        rank=args.rank, fit_positions=args.fit_positions, fusion=args.fusion, calibration_fraction=args.calibration_fraction, tpr=args.tpr, batch_size=args.batch_size,
        seed=args.seed, progress=not args.no_progress,
    )
    model = _classifier(args)
    channels = args.channels or input_channels(model)
    data = read_training_images(
        args.train, channels=channels, labeled=config.detector == "class",
        image_size=None if args.image_size is None else tuple(args.image_size), progress=config.progress,
    )
    guard, summary = fit_guard(model, data, config)
    guard.save(out)  # written to a temporary file, then renamed
    print(summary.render(out))
    return 0


def export(args: argparse.Namespace) -> int:
    """Run ``covguard export``: the model and its guard as one ONNX (or TorchScript) graph."""
    import torch

    from covguard.export import export_guard, verify_onnx
    from covguard.features import model_dtype
    from covguard.guard import load_guard

    out = _new_output(args.out, args.force)
    if not Path(args.detector).is_file():
        raise FileNotFoundError(f"--detector {args.detector!r} does not exist")
    model = _classifier(args)
    guard = load_guard(args.detector, model, strict_model=not args.no_strict_model)
    export_guard(guard, out, format=args.format, opset=args.opset)
    C, H, W = guard.detector.input_shape_
    print(
        f"wrote {out} ({args.format}): input images (N, {C}, {H}, {W}) float in [0, 1]; outputs logits (N, K), "
        f"score (N,), flagged (N,) = score > {guard.threshold_:.6g}"
    )
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401  # only whether it is installed
        except ImportError:
            print("onnxruntime is not installed: the file was not run (pip install 'covguard[export]')")
            return 0
        dtype = model_dtype(model)
        x = torch.rand(8, C, H, W, generator=torch.Generator().manual_seed(0)).to(dtype)
        check = verify_onnx(guard, out, x)
        print(
            f"onnxruntime vs covguard on {check['n']} random images: score max relative difference "
            f"{check['score_max_rel']:.2e}, logits max difference {check['logits_max_abs']:.2e}, "
            f"{check['flags_differ']} flags differ"
        )
    return 0


def _new_output(value: str, force: bool) -> Path:
    """``--out`` as a path: refused when it is a folder, or exists without ``--force``."""
    out = Path(value)
    if out.is_dir():
        raise ValueError(f"--out {value!r} is a folder; name the file to write")
    if out.exists() and not force:
        raise FileExistsError(f"--out {value!r} exists; pass --force to overwrite it")
    return out


def _classifier(args: argparse.Namespace) -> nn.Module:
    """The model of ``--model`` / ``--model-file`` with ``--weights``, on ``--device``, in eval mode."""
    from covguard.models.user import load_classifier

    return load_classifier(
        name=args.model, model_file=args.model_file, weights=args.weights, model_args=args.model_arg, device=args.device
    )
