"""Scoring overhead and fit cost next to the bare forward pass (timing benchmark).

- :func:`time_scoring`: for every detector configuration (:class:`DetectorSpec`) and batch size,
  the bare forward pass and the forward pass plus scoring, interleaved in each repeat;
  ``overhead = t(forward + detector) / t(forward) - 1``, the median over repeats of the
  per-repeat ratio (robust to load that drifts across a run). The naive reference
  (:class:`~covguard.bench.naive.NaiveReference`) is timed in the same repeats.
- :func:`time_fit`: time per image of the streaming fit (forward with the feature taps and
  ``partial_fit`` on the batches after the first; the one-off covariance estimation and
  standardization of ``finish_fit`` are a cost per fit, not per image) against one bare
  forward per image of the same batches.

Models are randomly initialized (timing does not depend on the weights); timings are wall clock
(:func:`time.perf_counter`) after warm-up calls; CUDA timings synchronize.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from covguard.bench.naive import NaiveReference, max_relative_error
from covguard.detectors import ClassMahalanobis, PatchMahalanobis, SimpleMahalanobis
from covguard.features import FeatureTap, eval_mode
from covguard.models import MODELS

__all__ = [
    "DetectorSpec",
    "FitTiming",
    "MODEL_LAYERS",
    "ScoringTiming",
    "detector_specs",
    "device_name",
    "interleaved",
    "make_model",
    "time_fit",
    "time_scoring",
    "timer",
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
        common = {"layers": layers, "covariance": self.covariance, "rank": max(self.rank, 1), "fit_positions": 1.0}
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



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(fn: Callable[[], object], device: torch.device, number: int) -> Callable[[], float]:
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


def interleaved(
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


def make_model(name: str, device: torch.device, channels_last: bool) -> nn.Module:
    """A randomly initialized (seed 0) benchmarked model in eval mode, channels_last if asked."""
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


def time_scoring(
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
    """Scoring overhead of each spec at each batch size, with its naive reference's (see the module docstring).

    Each detector is fitted on ``fit_images`` random images; the naive path is timed once per
    detector (its cost does not depend on the form) and its agreement checked for every form.
    """
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
            forward = timer(lambda: model(x), device, number)
            candidates = {"detector": timer(lambda d=det: d.score(x), device, number)}
            if time_naive:
                candidates["naive"] = timer(lambda r=naive: r.score(x), device, number)
            with torch.no_grad():
                times, paired = interleaved(candidates, forward, repeats, warmup=1 if batch_size >= 64 else 3)
            ratio = {name: [t / f for t, f in zip(times[name], paired[name])] for name in times}
            overhead = _median(ratio["detector"]) - 1
            naive_overhead = _median(ratio["naive"]) - 1 if time_naive else None
            rows.append(
                ScoringTiming(
                    model=model_name,
                    device=device_name(device),
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


def time_fit(
    model_name: str, model: nn.Module, batch_size: int, batches: tuple[int, int], repeats: int, device: torch.device, channels_last: bool,
    builders: dict[str, Callable[[], PatchMahalanobis]] | None = None,
) -> list[FitTiming]:
    """Streaming-fit time per image, vs forward: a fresh detector is fed ``small`` batches
    untimed (its accumulators allocated), then the ``large - small`` next batches are timed
    through the taps and ``partial_fit``, up to the reduction of every batch the accumulators
    hold back, alternating with bare forwards of the same batches.

    ``builders``: detector name -> a function returning an unfitted detector of ``model``
    (default: Simple and Class with diagonal forms on :data:`MODEL_LAYERS`).
    """
    layers = MODEL_LAYERS.get(model_name, ())
    small, large = batches
    loader = _loader(large, batch_size, seed=5, device=device, channels_last=channels_last)
    rows = []

    def forward_extra() -> float:
        _sync(device)
        tic = time.perf_counter()
        with torch.no_grad():
            for x, _ in loader[small:]:
                model(x)
        _sync(device)
        return time.perf_counter() - tic

    builders = builders or {
        "simple": lambda: SimpleMahalanobis(model, layers=layers, covariance="diag", fit_positions=1.0),
        "class": lambda: ClassMahalanobis(model, layers=layers, covariance="diag", fit_positions=1.0),
    }
    def stream(det: PatchMahalanobis, part: Sequence) -> None:
        with torch.no_grad(), eval_mode(model), FeatureTap(model, det.layers) as tap:
            for x, y in part:
                det.partial_fit(*tap(x), y)
        if det.exact_moments and det.fit_passes == 1:
            det.accumulated_moments()  # reduces the batches the moment accumulators hold back

    def stream_extra(build: Callable[[], PatchMahalanobis]) -> float:
        det = build()
        stream(det, loader[:small])  # untimed: allocates the accumulators
        _sync(device)
        tic = time.perf_counter()
        stream(det, loader[small:])
        _sync(device)
        return time.perf_counter() - tic

    for name, build in builders.items():
        fwd, fit = [], []
        stream_extra(build)  # warm-up
        for _ in range(repeats):
            fwd.append(forward_extra())
            fit.append(stream_extra(build))
        images = (large - small) * batch_size
        f_ms, t_ms = 1e3 * _median(fwd) / images, 1e3 * _median(fit) / images
        rows.append(FitTiming(model_name, device_name(device), name, batch_size, images, f_ms, t_ms, f_ms / t_ms))
    return rows



def device_name(device: torch.device) -> str:
    """``cuda (<name>)`` or ``cpu (<processor>, <n> threads)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

