"""Timing benchmark: what patch-Mahalanobis detectors cost next to the model they guard.

One run measures, on randomly initialized CIFAR ResNets (timing does not depend on the weights):

- **Scoring overhead**, for every detector (Simple, Class top-1, Class mixture) and covariance
  form (full, diag, low-rank k = 16/32/64): the bare forward pass and the forward pass plus
  scoring, interleaved in each repeat; ``overhead = t(forward + detector) / t(forward) - 1``,
  the median over repeats of the per-repeat ratio (robust to load that drifts across a run).
- **The naive reference** side by side, in the same repeats: explicit ``unfold`` into patch
  vectors, then ``(p - mu)^T P (p - mu)`` with the dense precision ``P`` (:class:`NaiveReference`);
  ``speedup = naive overhead / overhead`` is the measured ratio of scoring costs, and
  ``max rel err`` how far the two paths' layer scores differ (float32).
- **Fit**: time per image of the streaming fit (the slope between two loader sizes, so the
  one-off covariance estimation and the standardization pass cancel) against one bare forward
  per image of the same batches.
- **Memory**: peak resident memory of fitting, each measurement in a fresh subprocess so that
  peaks do not mix (``VmHWM`` of ``/proc/self/status``): Simple full at two data
  sizes, exact Class statistics, and ``ClassMahalanobis(basis_rank=...)`` (the reduced class
  statistics of :mod:`covguard.class_stats`) at 10 and 100 classes, on ResNet-18 ``layer4``
  (``D = 4608``).

Writes ``results.json`` and ``results.md``. Timings are wall clock (:func:`time.perf_counter`)
with PyTorch's default number of threads, after warm-up calls; CUDA timings synchronize.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.detectors import ClassMahalanobis, PatchMahalanobis, SimpleMahalanobis
from covguard.features import FeatureTap
from covguard.models import MODELS
from covguard.patches import patch_vectors
from covguard.report import markdown_table, write_json

__all__ = [
    "DetectorSpec",
    "add_timing_arguments",
    "main",
    "FitTiming",
    "MemoryPeak",
    "NaiveReference",
    "ScoringTiming",
    "TimingResult",
    "detector_specs",
    "render_markdown",
    "run_timing",
]

logger = logging.getLogger(__name__)

# Tapped layers of each benchmarked model: every stage.
MODEL_LAYERS: dict[str, tuple[str, ...]] = {
    "resnet18_32x32": ("layer1", "layer2", "layer3", "layer4"),
    "resnet20": ("layer1", "layer2", "layer3"),
}
FORMS: tuple[tuple[str, int], ...] = (("full", 0), ("diag", 0), ("lowrank", 16), ("lowrank", 32), ("lowrank", 64))
KINDS: tuple[tuple[str, str], ...] = (("simple", "-"), ("class", "top1"), ("class", "mixture"))
N_CLASSES = 10  # classes of the benchmarked models
FIT_IMAGES = 128  # default number of images behind the statistics of each timed detector
TOP_M = 3  # classes mixed by the Class mixture detector


@dataclass(frozen=True)
class DetectorSpec:
    """One benchmarked detector configuration."""

    kind: str  # "simple" or "class"
    scoring: str  # "-" (simple), "top1" or "mixture"
    covariance: str  # "full", "diag" or "lowrank"
    rank: int = 0  # lowrank k; 0 for the other forms

    @property
    def detector(self) -> str:
        """Display name of the detector: ``simple``, ``class-top1`` or ``class-mixture``."""
        return "simple" if self.kind == "simple" else f"class-{self.scoring}"

    @property
    def form(self) -> str:
        """Display name of the covariance form: ``full``, ``diag`` or ``lowrank-k``."""
        return f"lowrank-{self.rank}" if self.covariance == "lowrank" else self.covariance

    @property
    def name(self) -> str:
        return f"{self.detector}/{self.form}"

    def build(self, model: nn.Module, layers: Sequence[str]) -> PatchMahalanobis:
        """An unfitted detector of this configuration."""
        common = {"layers": layers, "covariance": self.covariance, "rank": max(self.rank, 1)}
        if self.kind == "simple":
            return SimpleMahalanobis(model, **common)
        return ClassMahalanobis(model, scoring=self.scoring, top_m=TOP_M, **common)


def detector_specs(quick: bool = False) -> list[DetectorSpec]:
    """Every detector and form (15 configurations); ``quick`` keeps full, diag and lowrank-64."""
    forms = [f for f in FORMS if not quick or f[1] in (0, 64)]
    return [DetectorSpec(kind, scoring, form, rank) for kind, scoring in KINDS for form, rank in forms]


@dataclass
class ScoringTiming:
    """Scoring cost of one detector at one batch size (medians over repeats)."""

    model: str
    device: str
    batch_size: int
    detector: str
    form: str
    forward_ips: float  # images/s of the bare forward
    detector_ips: float  # images/s of forward + scoring
    overhead: float  # median of t(forward + detector) / t(forward) - 1
    naive_overhead: float | None  # the same for the naive unfold reference of this detector
    speedup_vs_naive: float | None  # naive_overhead / overhead: ratio of scoring costs
    max_rel_err_vs_naive: float | None  # max |fast - naive| / |naive| over layer scores (float32)
    fit_seconds: float  # fit of the timed detector (fit_images images + covariance estimation)
    repeats: int


@dataclass
class FitTiming:
    """Streaming-fit cost per image against one bare forward per image."""

    model: str
    device: str
    detector: str
    batch_size: int
    images: int  # images in the difference between the two timed loader sizes
    forward_ms_per_image: float
    fit_ms_per_image: float
    throughput_ratio: float  # forward_ms / fit_ms: fit images/s as a fraction of forward images/s


@dataclass
class MemoryPeak:
    """Peak resident memory of one fit, measured in a fresh process."""

    what: str
    layer: str
    dim: int  # patch dimension D
    images: int
    classes: int
    peak_rss_mb: float
    baseline_rss_mb: float  # same process kind after imports, model and one forward (no fit)
    note: str = ""


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


# ---- the naive reference ------------------------------------------------------------------------


class NaiveReference:
    """The textbook computation of a fitted patch detector's scores, for timing and agreement checks.

    Every patch is unfolded into a vector ``p`` (:func:`~covguard.patches.patch_vectors`) and scored as
    ``(p - mu)^T P (p - mu)`` with the dense ``D x D`` precision ``P`` of its form
    (``P = proj diag(gain) proj^T + diag(diag)``), row-wise; class detectors score each image
    against the classes it weights (top-1, or the renormalized top-m probabilities).

    Parameters
    ----------
    detector : PatchMahalanobis
        A fitted Simple or Class detector.
    dtype : torch.dtype, default torch.float32
        Dtype of ``P`` and of the computation.
    """

    def __init__(self, detector: PatchMahalanobis, *, dtype: torch.dtype = torch.float32) -> None:
        self.detector = detector
        self.dtype = dtype
        device = next(detector.model.parameters()).device
        self.means: dict[str, Tensor] = {}
        self.precisions: dict[str, Tensor] = {}
        for layer, form in detector.forms_.items():
            K, D = form.mean.shape
            P = torch.zeros(K, D, D, dtype=torch.float64)
            if form.proj is not None:
                P += torch.einsum("kdr,kr,ker->kde", form.proj.double(), form.gain.double(), form.proj.double())
            if form.diag is not None:
                P += torch.diag_embed(form.diag.double())
            self.means[layer] = form.mean.to(dtype=dtype, device=device)  # (K, D)
            self.precisions[layer] = P.to(dtype=dtype, device=device)  # (K, D, D)

    def group_weights(self, logits: Tensor) -> Tensor | None:
        """(N, K) weights of each image's classes, or None for a Simple detector."""
        det = self.detector
        if not isinstance(det, ClassMahalanobis):
            return None
        if det.scoring == "top1":
            return F.one_hot(logits.argmax(1), logits.shape[1]).to(self.dtype)
        probs = logits.double().softmax(1)  # (N, K)
        top_p, top_k = probs.topk(min(det.top_m, probs.shape[1]), dim=1)  # (N, m)
        return torch.zeros_like(probs).scatter_(1, top_k, top_p / top_p.sum(1, keepdim=True)).to(self.dtype)

    def layer_scores(self, logits: Tensor, feats: dict[str, Tensor]) -> Tensor:
        """Aggregated squared distances, shape (N, n_layers), like ``detector.layer_scores``."""
        det = self.detector
        weights = self.group_weights(logits)  # (N, K) or None
        cols = []
        for layer in det.layers:
            f = feats[layer].to(self.dtype)
            g = det.gaussians[layer]
            p = patch_vectors(f, kernel_size=g.kernel_size, padding=g.padding)  # (N, L, D) explicit unfold
            mean, P = self.means[layer], self.precisions[layer]
            if weights is None:
                dev = p - mean[0]  # (N, L, D)
                d2 = ((dev @ P[0]) * dev).sum(-1)  # (N, L)
            else:
                d2 = torch.zeros(p.shape[:2], dtype=self.dtype, device=p.device)  # (N, L)
                for k in (weights > 0).any(0).nonzero().flatten().tolist():
                    rows = (weights[:, k] > 0).nonzero().flatten()
                    dev = p[rows] - mean[k]  # (n_k, L, D)
                    d2[rows] += weights[rows, k, None] * ((dev @ P[k]) * dev).sum(-1)
            cols.append(d2.mean(1) if det.aggregate == "mean" else d2.amax(1))
        return torch.stack(cols, dim=1)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """Combined score (N,): one forward pass capturing the layers, naive distances, z-scored sum."""
        det = self.detector
        with FeatureTap(det.model, det.layers) as tap:
            logits, feats = tap(x)
        return det.combine(self.layer_scores(logits, feats))


def max_relative_error(detector: PatchMahalanobis, naive: NaiveReference, x: Tensor) -> float:
    """max over images and layers of ``|fast - naive| / |naive|`` for the per-layer scores."""
    with torch.no_grad():
        fast = detector.layer_scores(x)  # (N, n_layers) float64
        with FeatureTap(detector.model, detector.layers) as tap:
            logits, feats = tap(x)
        ref = naive.layer_scores(logits, feats).double()
    return float(((fast - ref).abs() / ref.abs().clamp_min(1e-30)).max())


# ---- timing helpers -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(fn: Callable[[], object], device: torch.device, number: int) -> Callable[[], float]:
    """A function returning the wall time of ``number`` calls of ``fn``, per call."""

    def run() -> float:
        _sync(device)
        tic = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        return (time.perf_counter() - tic) / number

    return run


def _median(values: Sequence[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def _interleaved(
    candidates: dict[str, Callable[[], float]], forward: Callable[[], float], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per repeat, time the forward pass right before each candidate, alternating the order.

    Returns the candidate times and the paired forward times, each {name: [seconds per repeat]}.
    """
    for _ in range(warmup):
        forward()
        for run in candidates.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    paired: dict[str, list[float]] = {name: [] for name in candidates}
    for rep in range(repeats):
        for name, run in candidates.items():
            if rep % 2 == 0:
                t_fwd, t_run = forward(), run()
            else:
                t_run, t_fwd = run(), forward()
            times[name].append(t_run)
            paired[name].append(t_fwd)
    return times, paired


def _make_model(name: str, device: torch.device, channels_last: bool) -> nn.Module:
    if name not in MODELS or name not in MODEL_LAYERS:
        raise ValueError(f"models must be among {sorted(MODEL_LAYERS)}; got {name!r}")
    torch.manual_seed(0)
    model = MODELS[name](num_classes=N_CLASSES).eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _images(n: int, seed: int, device: torch.device, channels_last: bool) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=gen).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _loader(n_batches: int, batch_size: int, seed: int, device: torch.device, channels_last: bool) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (_images(batch_size, seed * 1000 + i, device, channels_last), torch.randint(0, N_CLASSES, (batch_size,), generator=gen).to(device))
        for i in range(n_batches)
    ]


# ---- the three measurements ---------------------------------------------------------------------


def _time_scoring(
    model_name: str,
    model: nn.Module,
    specs: Sequence[DetectorSpec],
    batch_sizes: Sequence[int],
    repeats: int,
    device: torch.device,
    channels_last: bool,
    fit_images: int,
    progress: bool,
) -> list[ScoringTiming]:
    layers = MODEL_LAYERS[model_name]
    rows: list[ScoringTiming] = []
    fit_batches = _loader(2, max(1, fit_images // 2), seed=1, device=device, channels_last=channels_last)
    holdout = [_images(32, seed=2, device=device, channels_last=channels_last)]
    naive_done: set[str] = set()
    for spec in tqdm(specs, desc=f"scoring {model_name}", disable=not progress, leave=False):
        tic = time.perf_counter()
        det = spec.build(model, layers).fit(fit_batches, holdout=holdout, progress=False)
        fit_seconds = time.perf_counter() - tic
        # The naive cost depends on the detector, not on the form: time it once per detector, with
        # the first form's statistics; check agreement for every form on a few images.
        naive = NaiveReference(det)
        err = max_relative_error(det, naive, _images(8, seed=3, device=device, channels_last=channels_last))
        time_naive = spec.detector not in naive_done
        naive_done.add(spec.detector)
        for batch_size in batch_sizes:
            x = _images(batch_size, seed=4, device=device, channels_last=channels_last)
            number = max(1, min(8, 64 // batch_size))  # calls per measurement for tiny batches
            forward = _timer(lambda: model(x), device, number)
            candidates = {"detector": _timer(lambda d=det: d.score(x), device, number)}
            if time_naive:
                candidates["naive"] = _timer(lambda r=naive: r.score(x), device, number)
            with torch.no_grad():
                times, paired = _interleaved(candidates, forward, repeats, warmup=1 if batch_size >= 64 else 3)
            ratio = {name: [t / f for t, f in zip(times[name], paired[name])] for name in times}
            overhead = _median(ratio["detector"]) - 1
            naive_overhead = _median(ratio["naive"]) - 1 if time_naive else None
            rows.append(
                ScoringTiming(
                    model=model_name,
                    device=_device_name(device),
                    batch_size=batch_size,
                    detector=spec.detector,
                    form=spec.form,
                    forward_ips=batch_size / _median(paired["detector"]),
                    detector_ips=batch_size / _median(times["detector"]),
                    overhead=overhead,
                    naive_overhead=naive_overhead,
                    speedup_vs_naive=None,
                    max_rel_err_vs_naive=err,
                    fit_seconds=fit_seconds,
                    repeats=repeats,
                )
            )
            logger.info("%s %s bs=%d overhead %.3f", model_name, spec.name, batch_size, overhead)
        del det, naive
    # Every form of a detector is compared with that detector's naive timing at the same batch size.
    naive_of = {(r.detector, r.batch_size): r.naive_overhead for r in rows if r.naive_overhead is not None}
    for r in rows:
        r.naive_overhead = naive_of.get((r.detector, r.batch_size))
        if r.naive_overhead is not None:
            r.speedup_vs_naive = r.naive_overhead / r.overhead if r.overhead > 0 else None  # None: below timing noise
    return rows


def _time_fit(
    model_name: str, model: nn.Module, batch_size: int, batches: tuple[int, int], repeats: int, device: torch.device, channels_last: bool
) -> list[FitTiming]:
    """Streaming-fit time per image: slope of ``fit`` time between two loader sizes, vs forward."""
    layers = MODEL_LAYERS[model_name]
    small, large = batches
    loader = _loader(large, batch_size, seed=5, device=device, channels_last=channels_last)
    holdout = [_images(2, seed=6, device=device, channels_last=channels_last)]
    rows = []

    def forward_extra() -> float:
        _sync(device)
        tic = time.perf_counter()
        with torch.no_grad():
            for x, _ in loader[small:]:
                model(x)
        _sync(device)
        return time.perf_counter() - tic

    for name, build in (
        ("simple", lambda: SimpleMahalanobis(model, layers=layers, covariance="diag")),
        ("class", lambda: ClassMahalanobis(model, layers=layers, covariance="diag")),
    ):
        fit_small = _timer(lambda: build().fit(loader[:small], holdout=holdout, progress=False), device, 1)
        fit_large = _timer(lambda: build().fit(loader, holdout=holdout, progress=False), device, 1)
        fwd, fit = [], []
        fit_small()  # warm-up
        for _ in range(repeats):
            fwd.append(forward_extra())
            fit.append(fit_large() - fit_small())
        images = (large - small) * batch_size
        f_ms, t_ms = 1e3 * _median(fwd) / images, 1e3 * _median(fit) / images
        rows.append(FitTiming(model_name, _device_name(device), name, batch_size, images, f_ms, t_ms, f_ms / t_ms))
    return rows


def _memory_child() -> None:
    """Entry point of a memory-measurement subprocess: one fit, then print the peak RSS as JSON."""
    job = json.loads(sys.argv[1])
    torch.manual_seed(0)
    classes = job["classes"]
    model = MODELS["resnet18_32x32"](num_classes=classes).eval()
    layer, batch_size = job["layer"], job["batch_size"]

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(7)
        left = job["images"]
        while left > 0:
            n = min(batch_size, left)
            yield torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, classes, (n,), generator=gen)
            left -= n

    what = job["what"]
    if what == "baseline":
        with torch.no_grad():
            model(torch.rand(batch_size, 3, 32, 32))
    elif what == "simple-full":
        SimpleMahalanobis(model, layers=[layer], covariance="full").fit(batches(), progress=False)
    elif what == "class-exact":
        ClassMahalanobis(model, layers=[layer], covariance="lowrank", rank=64).fit(batches(), progress=False)
    elif what == "class-reduced":
        loader = _ReusableBatches(batches)  # two passes over the same images
        ClassMahalanobis(model, layers=[layer], covariance="lowrank", rank=min(64, job["rank"]), basis_rank=job["rank"]).fit(loader, progress=False)
    else:
        raise ValueError(f"unknown memory job {what!r}")
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of ``/proc/self/status`` (reset by
    exec), else ``ru_maxrss``, which Linux carries over from the forking parent across exec."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _ReusableBatches:
    """A re-iterable loader over a generator function (each pass regenerates the same batches)."""

    def __init__(self, make: Callable[[], Iterator]) -> None:
        self.make = make

    def __iter__(self) -> Iterator:
        return self.make()


def _peak_rss(job: dict) -> float:
    """Run one memory job in a fresh interpreter; its peak RSS in MB."""
    code = "from covguard.bench.timing import _memory_child; _memory_child()"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory job {job} failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _measure_memory(images: Sequence[int], classes: Sequence[int], rank: int, progress: bool) -> list[MemoryPeak]:
    layer, dim, batch_size = "layer4", 512 * 9, 64  # small batches: the statistics, not the activations, set the peak
    jobs = [("simple-full", n, N_CLASSES) for n in images]
    jobs += [("class-exact", min(images), k) for k in classes if k <= 10]
    jobs += [("class-reduced", min(images), k) for k in classes]
    rows = []
    baselines: dict[int, float] = {}
    for what, n, k in tqdm(jobs, desc="memory", disable=not progress, leave=False):
        if k not in baselines:
            baselines[k] = _peak_rss({"what": "baseline", "images": batch_size, "classes": k, "layer": layer, "batch_size": batch_size})
        peak = _peak_rss({"what": what, "images": n, "classes": k, "layer": layer, "batch_size": batch_size, "rank": rank})
        note = f"basis rank {rank}" if what == "class-reduced" else ""
        rows.append(MemoryPeak(what, layer, dim, n, k, peak, baselines[k], note))
    for k in classes:
        if k > 10:  # exact per-class scatters alone: K D^2 float64, not run
            need = k * dim * dim * 8 / 2**20
            rows.append(MemoryPeak("class-exact", layer, dim, min(images), k, float("nan"), float("nan"), f"not run: scatters alone need {need:.0f} MB"))
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _environment(device: torch.device, channels_last: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "device": _device_name(device),
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
        model = _make_model(model_name, device, channels_last)
        result.scoring += _time_scoring(model_name, model, specs, batch_sizes, repeats, device, channels_last, fit_images, progress)
        if fit:
            result.fit += _time_fit(model_name, model, fit_batch_size, fit_batches, max(1, min(repeats, 2)), device, channels_last)
    if memory:
        result.memory = _measure_memory(memory_images, memory_classes, basis_rank, progress)
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


# ---- command line (``covguard bench timing`` and ``benchmarks/timing.py``) -------------------------


def add_timing_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the timing benchmark's options to ``parser``; returns it."""
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
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the benchmark with parsed ``args``, print its tables; returns the exit status."""
    result = run_timing(
        args.out,
        models=tuple(args.models),
        batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats,
        quick=args.quick,
        device=args.device,
        detectors=args.detectors,
        channels_last=not args.nchw,
        fit=not args.no_fit,
        memory=not args.no_memory,
        memory_images=args.memory_images,
        memory_classes=tuple(args.memory_classes),
        progress=not args.no_progress,
    )
    print(render_markdown(result))
    print(f"Report written to {args.out}")
    return 0
