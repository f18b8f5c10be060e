"""Timing benchmark: a tiny end-to-end run and its measurements (the command line: ``tests/test_cli.py``).

The fast path against the naive unfold path: ``test_naive.py``.
"""

import json

import pytest

from covguard.bench.timing import run_timing
from covguard.bench.timing_memory import run_memory_job
from covguard.bench.timing_speed import detector_specs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_writes_json_and_table(tmp_path):
    specs = ["simple/lowrank-16", "class-top1/diag", "class-mixture/full"]
    result = run_timing(
        tmp_path, models=("resnet20",), batch_sizes=(32,), repeats=1, detectors=specs,
        fit_batches=(1, 2), fit_batch_size=4, fit_images=16, memory=False, progress=False,
    )
    assert [(r.detector, r.form) for r in result.scoring] == [("simple", "lowrank-16"), ("class-top1", "diag"), ("class-mixture", "full")]
    for r in result.scoring:
        assert r.forward_ips > 0 and r.detector_ips > 0 and r.overhead > -1
        assert r.naive_overhead is not None  # every form is compared with its detector's naive path
        assert r.max_rel_err_vs_naive <= 1e-4
    assert {r.detector for r in result.fit} == {"simple", "class"}
    assert all(r.forward_ms_per_image > 0 and abs(r.fit_ms_per_image) < float("inf") for r in result.fit)  # a slope: noisy at toy size
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["detectors"] == specs and len(saved["scoring"]) == 3
    table = (tmp_path / "results.md").read_text()
    assert "| resnet20 | 32 | class-mixture | full |" in table and "throughput_ratio" in table


def test_specs_cover_every_detector_and_form():
    names = {s.name for s in detector_specs()}
    assert len(names) == 15 and "class-mixture/lowrank-32" in names and "simple/diag" in names
    assert {s.form for s in detector_specs(quick=True)} == {"full", "diag", "lowrank-64"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"models": ("vgg",)}, "models must be among"),
        ({"detectors": ["simple/lowrank-8"]}, "detectors must be among"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"batch_sizes": (0,)}, "batch_sizes must be positive"),
        ({"fit_batches": (2, 2)}, "fit_batches must be"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_timing(tmp_path, **kwargs)


def test_memory_job_reduced_class_statistics_runs():
    """The subprocess's job, run in-process at toy size (the real run spawns fresh interpreters)."""
    job = {"what": "class-reduced", "images": 12, "classes": 3, "layer": "layer4", "batch_size": 6, "rank": 8}
    assert run_memory_job(job) > 0
