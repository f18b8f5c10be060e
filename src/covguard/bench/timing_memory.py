"""Peak resident memory of fitting, each measurement in a fresh interpreter (timing benchmark).

Every job fits one detector on ResNet-18 ``layer4`` (``D = 4608``) in a subprocess and reads the
process's peak RSS (``VmHWM`` of ``/proc/self/status``), so peaks of different jobs do not mix:
Simple full at two data sizes, exact Class statistics, and ``ClassMahalanobis(basis_rank=...)``
(the reduced class statistics of :mod:`covguard.class_stats`) at 10 and 100 classes. A job of
kind ``baseline`` runs imports, model and one forward only, to show the fixed part of the peak.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from covguard.bench.timing_speed import N_CLASSES
from covguard.detectors import ClassMahalanobis, SimpleMahalanobis
from covguard.models import MODELS

__all__ = ["MemoryPeak", "measure_memory", "run_memory_job"]

# What a fresh interpreter runs for one job (argv[1]: the job as JSON); prints its peak RSS as JSON.
_CHILD = (
    "import json, sys; from covguard.bench.timing_memory import run_memory_job; "
    "print(json.dumps({'peak_rss_mb': run_memory_job(json.loads(sys.argv[1]))}))"
)


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


def run_memory_job(job: dict) -> float:
    """Run one memory job in this process: one fit (or the baseline forward); the peak RSS in MB.

    ``job`` holds ``what`` (``baseline``, ``simple-full``, ``class-exact`` or ``class-reduced``),
    ``images``, ``classes``, ``layer``, ``batch_size`` and, for ``class-reduced``, ``rank``.
    """
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
        SimpleMahalanobis(model, layers=[layer], covariance="full", fit_positions=1.0).fit(batches(), progress=False)
    elif what == "class-exact":
        ClassMahalanobis(model, layers=[layer], covariance="lowrank", rank=64, fit_positions=1.0).fit(batches(), progress=False)
    elif what == "class-reduced":
        loader = _ReusableBatches(batches)  # two passes over the same images
        ClassMahalanobis(model, layers=[layer], covariance="lowrank", rank=min(64, job["rank"]), basis_rank=job["rank"],
                         fit_positions=1.0).fit(loader, progress=False)
    else:
        raise ValueError(f"unknown memory job {what!r}")
    return _peak_rss_mb()


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
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory job {job} failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def measure_memory(images: Sequence[int], classes: Sequence[int], rank: int, progress: bool) -> list[MemoryPeak]:
    """Peak RSS of each fit, one fresh subprocess per job, next to the baseline of its class count.

    Exact class statistics run up to 10 classes; above that a row says what their scatters alone
    would need.
    """
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
