"""``covguard bench throughput``: ``covguard score`` end to end next to the bare model, in one run.

On the same images (``N`` synthetic PNGs written to a temporary folder, or ``--images``) and at
the same batch size, side by side:

- **model**: the bare forward pass over the images already decoded (tensors stacked in batches
  beforehand), in this process: the reference;
- **guard**: the guard (forward pass + detector) over the same tensors: what scoring costs
  without reading and decoding files;
- **score --workers W**, for each ``W``: ``covguard score`` run in a fresh interpreter, timed
  around its ``main()`` (loading model and guard, starting workers, reading, decoding, scoring,
  writing the CSV), with the peak resident memory (``VmHWM``) of the scoring process and the
  largest peak of its worker processes.

``ratio = score images/s / model images/s``. The model and the guard are timed before and after
the score runs and the faster of the two is kept (the reference least favourable to the ratio).
Without ``--detector`` the guard is fitted here (a randomly initialized model, Simple Mahalanobis
on the model's stages): throughput does not depend on the weights. Timings are wall clock; the
load average of the machine is recorded before and after, since other processes slow all rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

__all__ = [
    "ScoreRun", "ThroughputConfig", "ThroughputResult", "measure", "render_markdown", "run_score_job", "run_throughput",
    "write_synthetic_images",
]

# What a fresh interpreter runs for one score run (argv[1]: covguard's argv as JSON); prints its timings as JSON.
# It hands the CLI in (this module is imported by covguard.cli: importing the CLI here would be a cycle).
_CHILD = (
    "import json, sys; from covguard.bench.throughput import run_score_job; from covguard.cli import build_parser, main; "
    "print(json.dumps(run_score_job(json.loads(sys.argv[1]), build_parser=build_parser, main=main)))"
)


@dataclass(frozen=True)
class ThroughputConfig:
    """What ``covguard bench throughput`` measures."""

    n_images: int = 10_000  # synthetic images written (ignored with images)
    image_size: int = 32  # side of the synthetic images, pixels
    images: str | None = None  # folder or tar to score instead of synthetic images
    model: str = "resnet20"  # name in covguard.models.MODELS
    weights: str | None = None  # with detector: the model's weights
    detector: str | None = None  # a saved guard; None: fit one here on the model with random weights
    workers: tuple[int, ...] = (0, 2)  # --workers values of the score runs
    batch_size: int = 64  # of every row
    device: str = "cpu"
    fit_images: int = 512  # images that fit the guard, and as many that calibrate it (without detector; fewer: half each)
    seed: int = 0


@dataclass(frozen=True)
class ScoreRun:
    """One ``covguard score`` run."""

    workers: int
    seconds: float  # around covguard's main(): loading, worker start, reading, decoding, scoring, CSV
    startup_seconds: float  # before main(): the CLI's imports (building its parser)
    process_seconds: float  # the whole subprocess, interpreter start included
    images_per_s: float  # images / seconds
    ratio: float  # images_per_s / model images/s
    guard_ratio: float  # images_per_s / guard images/s
    peak_rss_mb: float  # VmHWM of the scoring process
    worker_peak_rss_mb: float  # largest peak RSS among its child processes (0 without workers)


@dataclass
class ThroughputResult:
    """Images per second of each row, and the machine they were measured on."""

    config: dict
    images: int
    threads: int  # torch threads of the model rows and of the score runs
    cpus: int
    load_before: tuple[float, float, float]  # os.getloadavg(): 1, 5, 15 minutes
    load_after: tuple[float, float, float]
    decode_images_per_s: float  # decoding alone, one process (while preparing the tensors)
    model_images_per_s: list[float]  # before and after the score runs
    guard_images_per_s: list[float]
    runs: list[ScoreRun] = field(default_factory=list)


def run_score_job(argv: list[str], *, build_parser: Callable[[], object], main: Callable[[list[str]], int]) -> dict:
    """Run ``covguard`` (:func:`covguard.cli.main`) with ``argv`` in this process: exit status, seconds, peak RSS (MB).

    ``startup_seconds``: building the CLI parser, which imports covguard's commands (paid by
    every command, timed apart); ``seconds``: ``main(argv)`` after that. Child processes (the
    decoding workers and their fork server) are sampled every 0.1 s for their ``VmHWM``.
    """
    from covguard.bench.timing_memory import _peak_rss_mb

    tic = time.perf_counter()
    build_parser()
    startup = time.perf_counter() - tic
    peaks: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            for pid in _descendants(os.getpid()):
                peaks[pid] = max(peaks.get(pid, 0.0), _status_mb(pid, "VmHWM"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tic = time.perf_counter()
    status = main(argv)
    seconds = time.perf_counter() - tic
    done.set()
    sampler.join()
    return {
        "status": status, "startup_seconds": startup, "seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
        "worker_peak_rss_mb": max(peaks.values(), default=0.0),
    }


def _descendants(pid: int) -> list[int]:
    """Process ids of the children of ``pid``, their children, ... (``/proc/PID/task/TID/children``)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{parent}/task") for c in Path(f"/proc/{parent}/task/{t}/children").read_text().split()]
        except OSError:  # gone meanwhile, or no /proc
            kids = []
        found += kids
        todo += kids
    return found


def _status_mb(pid: int, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def write_synthetic_images(folder: Path, n: int, size: int, *, seed: int = 0) -> None:
    """``n`` RGB PNGs of ``size`` x ``size``: smooth random colour fields plus noise (like small photos)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8), "RGB")
        smooth = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.int16)  # (H, W, 3)
        pixels = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{k:06d}.png")


def run_throughput(config: ThroughputConfig, work: str | Path, *, progress: bool = True) -> ThroughputResult:
    """Measure every row of the benchmark; temporary files (images, model, guard, CSVs) go to ``work``.

    Raises
    ------
    ValueError
        ``detector`` without ``weights`` (or the reverse); an image that cannot be decoded; a score
        run that fails.
    """
    from covguard.guard import load_guard
    from covguard.imagefiles import decode_image, iter_images
    from covguard.models import build_model, load_model

    if (config.detector is None) != (config.weights is None):
        raise ValueError("give --detector and --weights together (a saved guard and its model's weights), or neither")
    work = Path(work)
    load_before = os.getloadavg()
    images = Path(config.images) if config.images else work / "images"
    if config.images is None:
        write_synthetic_images(images, config.n_images, config.image_size, seed=config.seed)
    if config.detector is None:
        torch.manual_seed(config.seed)
        model = build_model(config.model).eval()
        weights, detector = work / "model.safetensors", work / "guard.safetensors"
        _save_weights(model, weights)
    else:
        weights, detector = Path(config.weights), Path(config.detector)
        model = load_model(config.model, weights, device=config.device)
    guard = load_guard(detector, model) if config.detector else None
    channels, height, width = (3, config.image_size, config.image_size) if guard is None else guard.detector.input_shape_
    tic = time.perf_counter()
    items = iter_images(images, order="archive")[1]
    xs = [decode_image(data, channels=channels, size=(height, width)) for _, data in items]  # each (C, H, W); a bad file raises
    decode_rate = len(xs) / (time.perf_counter() - tic)
    batches = [torch.stack(xs[i : i + config.batch_size]) for i in range(0, len(xs), config.batch_size)]  # (B, C, H, W)
    del xs
    if guard is None:
        guard = _fit_guard(model, batches, config)
        guard.save(detector)
    model.to(config.device)
    batches = [x.to(config.device) for x in batches]
    threads = torch.get_num_threads()
    result = ThroughputResult(
        config=asdict(config), images=sum(len(x) for x in batches), threads=threads, cpus=os.cpu_count() or 0,
        load_before=load_before, load_after=load_before, decode_images_per_s=decode_rate,
        model_images_per_s=[_rate(model, batches)], guard_images_per_s=[_rate(guard, batches)],
    )
    for workers in config.workers:
        argv = ["--threads", str(threads), "score", "--detector", str(detector), "--model", config.model,
                "--weights", str(weights), "--images", str(images), "--out", str(work / f"scores-{workers}.csv"),
                "--batch-size", str(config.batch_size), "--workers", str(workers), "--device", config.device,
                "--force", *([] if progress else ["--no-progress"])]  # fmt: skip
        tic = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argv)], stdout=subprocess.PIPE, text=True, check=False)
        wall = time.perf_counter() - tic
        job = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"status": done.returncode}
        if job["status"] != 0:
            raise ValueError(f"covguard score --workers {workers} failed with exit status {job['status']}")
        rate = result.images / job["seconds"]
        result.runs.append(
            ScoreRun(workers, job["seconds"], job["startup_seconds"], wall, rate, 0.0, 0.0, job["peak_rss_mb"], job["worker_peak_rss_mb"])
        )
    result.model_images_per_s.append(_rate(model, batches))
    result.guard_images_per_s.append(_rate(guard, batches))
    model_rate, guard_rate = max(result.model_images_per_s), max(result.guard_images_per_s)
    result.runs = [
        ScoreRun(**{**asdict(r), "ratio": r.images_per_s / model_rate, "guard_ratio": r.images_per_s / guard_rate})
        for r in result.runs
    ]
    result.load_after = os.getloadavg()
    return result


def render_markdown(result: ThroughputResult) -> str:
    """The result as a Markdown table, with the machine's load."""
    c = result.config
    lines = [
        f"# Scoring throughput: {result.images} images, {c['model']}, batch {c['batch_size']}, {c['device']}",
        "",
        f"{result.cpus} CPUs, {result.threads} torch threads; load average (1, 5, 15 min) "
        f"{_load(result.load_before)} before, {_load(result.load_after)} after (other processes slow every row).",
        "",
        "| what | images/s | ratio to model | ratio to guard | peak RSS (MB) | largest worker peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| model on decoded tensors (before / after) | {_pair(result.model_images_per_s)} | 1 | | | |",
        f"| guard on decoded tensors (before / after) | {_pair(result.guard_images_per_s)} | "
        f"{max(result.guard_images_per_s) / max(result.model_images_per_s):.2f} | 1 | | |",
        f"| decoding alone, one process | {result.decode_images_per_s:.0f} | | | | |",
    ]
    for r in result.runs:
        lines.append(
            f"| covguard score --workers {r.workers} ({r.seconds:.1f} s; + {r.startup_seconds:.1f} s CLI imports; "
            f"process {r.process_seconds:.1f} s) | {r.images_per_s:.0f} | **{r.ratio:.2f}** | {r.guard_ratio:.2f} "
            f"| {r.peak_rss_mb:.0f} | {r.worker_peak_rss_mb:.0f} |"
        )
    lines += [
        "",
        "Ratios: over the faster of the two measurements of the model (the guard); score is timed around its main(), "
        "CLI imports apart. Target: score >= 0.8 x model.",
    ]
    return "\n".join(lines) + "\n"


def measure(config: ThroughputConfig, out: str | Path, *, progress: bool = True) -> ThroughputResult:
    """:func:`run_throughput` in a temporary folder; ``results.json`` and ``results.md`` written to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="covguard-throughput-") as work:
        result = run_throughput(config, work, progress=progress)
    (out / "results.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(result))
    return result


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _fit_guard(model: nn.Module, batches: Sequence[Tensor], config: ThroughputConfig):
    from covguard.detectors import SimpleMahalanobis
    from covguard.fitting import default_layers
    from covguard.guard import Guard

    x = torch.cat(list(batches))[: 2 * config.fit_images]  # (n, C, H, W)
    n_fit = len(x) // 2  # the rest calibrates
    split = lambda t: [t[i : i + config.batch_size] for i in range(0, len(t), config.batch_size)]  # noqa: E731
    detector = SimpleMahalanobis(model, layers=list(default_layers(model, x[:1])), covariance="full", fit_positions=1.0)
    detector.fit(split(x[:n_fit]), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few calibration images: the threshold does not matter here
        return Guard(model, detector).calibrate(split(x[n_fit:]), tpr=0.95, progress=False)


@torch.no_grad()
def _rate(f: nn.Module | object, batches: Sequence[Tensor]) -> float:
    """Images per second of ``f`` (a model or a guard) over the batches, after one warm-up batch."""
    f(batches[0])
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for x in batches:
        f(x)
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    return sum(len(x) for x in batches) / (time.perf_counter() - tic)


def _pair(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in values)


def _load(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
