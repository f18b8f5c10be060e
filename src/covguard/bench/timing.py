"""Timing benchmark: what patch-Mahalanobis detectors cost next to the model they guard.

One run measures, on randomly initialized CIFAR ResNets (timing does not depend on the weights):

- **Scoring overhead**, for every detector (Simple, Class top-1, Class mixture) and covariance
  form (full, diag, low-rank k = 16/32/64): the bare forward pass and the forward pass plus
  scoring, interleaved in each repeat; ``overhead = t(forward + detector) / t(forward) - 1``,
  the median over repeats of the per-repeat ratio (robust to load that drifts across a run).
- **The naive reference** side by side, in the same repeats: explicit ``unfold`` into patch
  vectors, then ``(p - mu)^T P (p - mu)`` with the dense precision ``P``
  (:class:`~covguard.bench.naive.NaiveReference`); ``speedup = naive overhead / overhead`` is the
  measured ratio of scoring costs, and ``max rel err`` how far the two paths' layer scores differ
  (float32).
- **Fit**: time per image of the streaming fit (taps and ``partial_fit``; the one-off covariance
  estimation and standardization are a cost per fit) against one bare forward per image of the
  same batches.
- **Memory**: peak resident memory of fitting, each measurement in a fresh subprocess so that
  peaks do not mix (:mod:`covguard.bench.timing_memory`).

The scoring and fit measurements live in :mod:`covguard.bench.timing_speed`; this module runs
them, writes ``results.json`` and ``results.md`` and renders the tables. Timings are wall clock
(:func:`time.perf_counter`) with PyTorch's default number of threads, after warm-up calls; CUDA
timings synchronize.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from covguard.bench.timing_memory import MemoryPeak, measure_memory
from covguard.bench.timing_speed import (
    FIT_IMAGES,
    MODEL_LAYERS,
    FitTiming,
    ScoringTiming,
    detector_specs,
    device_name,
    make_model,
    time_fit,
    time_scoring,
)
from covguard.report import markdown_table, write_json

__all__ = ["TimingResult", "render_markdown", "run_timing"]


@dataclass
class TimingResult:
    """Everything one run measured, as written to ``results.json``."""

    config: dict
    environment: dict
    scoring: list[ScoringTiming] = field(default_factory=list)
    fit: list[FitTiming] = field(default_factory=list)
    memory: list[MemoryPeak] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _environment(device: torch.device, channels_last: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "device": device_name(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_format": "channels_last" if channels_last else "contiguous",
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_timing(
    out_dir: str | Path,
    *,
    models: Sequence[str] = ("resnet18_32x32", "resnet20"),
    batch_sizes: Sequence[int] = (1, 64, 256),
    repeats: int = 5,
    quick: bool = False,
    device: str | torch.device = "cpu",
    detectors: Sequence[str] | None = None,
    channels_last: bool = True,
    fit: bool = True,
    fit_batches: tuple[int, int] | None = None,
    fit_batch_size: int = 256,
    fit_images: int = FIT_IMAGES,
    memory: bool = True,
    memory_images: Sequence[int] | None = None,
    memory_classes: Sequence[int] = (10, 100),
    basis_rank: int = 256,
    progress: bool = True,
) -> TimingResult:
    """Run the timing benchmark and write ``results.json`` and ``results.md`` to ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Report folder (created).
    models : sequence of str
        Keys of :data:`MODEL_LAYERS`; every stage of each model is tapped.
    batch_sizes : sequence of int
        Batch sizes of the scoring measurements.
    repeats : int
        Interleaved repeats per measurement (medians are reported).
    quick : bool
        Reduced run: full, diag and lowrank-64 only, at most 3 repeats, fit on fewer batches,
        memory at 250 and 1,000 images.
    device : str or torch.device
        ``"cpu"`` or a CUDA device.
    detectors : sequence of str, optional
        Restrict to these configurations, by name (``"simple/lowrank-64"``, ``"class-top1/full"``).
    channels_last : bool
        Run the model (and so its feature maps) in channels_last layout, oneDNN's faster CPU path.
    fit, memory : bool
        Include the fit-throughput and the peak-memory measurements.
    fit_batches : (int, int), optional
        Loader sizes (in batches) whose fit times are differenced; default (1, 3), quick (1, 2).
    fit_batch_size : int
        Batch size of the fit measurement.
    fit_images : int
        Images behind the statistics of each timed detector (two batches).
    memory_images : sequence of int, optional
        Data sizes of the memory measurements; default (1000, 10000), quick (250, 1000).
    memory_classes : sequence of int
        Class counts of the class-statistics memory measurements.
    basis_rank : int
        Rank of the shared basis of the reduced class statistics.
    progress : bool
        Show progress bars.

    Returns
    -------
    TimingResult
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    if fit_batches is not None and not 1 <= fit_batches[0] < fit_batches[1]:
        raise ValueError(f"fit_batches must be two loader sizes 1 <= small < large; got {fit_batches}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive integers; got {list(batch_sizes)}")
    unknown = [m for m in models if m not in MODEL_LAYERS]
    if unknown:
        raise ValueError(f"models must be among {sorted(MODEL_LAYERS)}; got {unknown}")
    device = torch.device(device)
    specs = detector_specs(quick)
    if detectors is not None:
        known = {s.name: s for s in detector_specs(False)}
        missing = [d for d in detectors if d not in known]
        if missing:
            raise ValueError(f"detectors must be among {sorted(known)}; got {missing}")
        specs = [known[d] for d in detectors]
    fit_batches = fit_batches or ((1, 2) if quick else (1, 3))
    memory_images = memory_images or ((250, 1000) if quick else (1000, 10000))
    repeats = min(repeats, 3) if quick else repeats
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    result = TimingResult(
        config={
            "models": list(models),
            "batch_sizes": list(batch_sizes),
            "repeats": repeats,
            "quick": quick,
            "channels_last": channels_last,
            "detectors": [s.name for s in specs],
            "fit_batches": list(fit_batches),
            "fit_batch_size": fit_batch_size,
            "memory_images": list(memory_images),
            "memory_classes": list(memory_classes),
            "basis_rank": basis_rank,
            "fit_images": fit_images,
        },
        environment=_environment(device, channels_last),
    )
    for model_name in models:
        model = make_model(model_name, device, channels_last)
        result.scoring += time_scoring(model_name, model, specs, batch_sizes, repeats, device, channels_last, fit_images, progress)
        if fit:
            result.fit += time_fit(model_name, model, fit_batch_size, fit_batches, max(1, min(repeats, 2)), device, channels_last)
    if memory:
        result.memory = measure_memory(memory_images, memory_classes, basis_rank, progress)
    result.environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result.seconds = time.perf_counter() - tic
    write_json(result, out / "results.json")
    (out / "results.md").write_text(render_markdown(result))
    return result


def render_markdown(result: TimingResult) -> str:
    """The run as markdown: environment, scoring table, fit table, memory table."""
    env = result.environment
    lines = [
        "## Timing",
        "",
        f"{env['device']}, torch {env['torch']}, {env['memory_format']} model; {env['cpu']}. "
        f"Load average at start {_fmt_load(env.get('load_average_start'))}, end {_fmt_load(env.get('load_average_end'))}. "
        f"Medians of {result.config['repeats']} interleaved repeats; overhead = t(forward + detector) / t(forward) - 1; "
        "speedup = naive overhead / overhead (explicit unfold + dense precision, same run).",
        "",
    ]
    rows = [
        {
            **asdict(r),
            "overhead": f"{100 * r.overhead:.1f}%",
            "naive_overhead": None if r.naive_overhead is None else f"{100 * r.naive_overhead:.0f}%",
            "speedup_vs_naive": None if r.speedup_vs_naive is None else f"{r.speedup_vs_naive:.1f}x",
            "max_rel_err_vs_naive": None if r.max_rel_err_vs_naive is None else f"{r.max_rel_err_vs_naive:.1e}",
            "forward_ips": f"{r.forward_ips:.0f}",
            "detector_ips": f"{r.detector_ips:.0f}",
        }
        for r in result.scoring
    ]
    cols = ["model", "batch_size", "detector", "form", "forward_ips", "detector_ips", "overhead", "naive_overhead", "speedup_vs_naive", "max_rel_err_vs_naive"]
    lines += [markdown_table(rows, cols), ""]
    if result.fit:
        lines += ["### Fit (streaming statistics of every tapped layer)", ""]
        fit_rows = [{**asdict(r), "throughput_ratio": f"{r.throughput_ratio:.2f}x"} for r in result.fit]
        lines += [markdown_table(fit_rows, ["model", "detector", "batch_size", "images", "forward_ms_per_image", "fit_ms_per_image", "throughput_ratio"], floatfmt=".2f"), ""]
    if result.memory:
        lines += ["### Peak memory of fitting (ResNet-18 layer4, fresh process each)", ""]
        lines += [markdown_table([asdict(r) for r in result.memory], ["what", "layer", "dim", "images", "classes", "peak_rss_mb", "baseline_rss_mb", "note"], floatfmt=".0f"), ""]
    lines.append(f"Total time {result.seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def _fmt_load(load: Sequence[float] | None) -> str:
    return "n/a" if not load else "/".join(f"{v:.1f}" for v in load)

