"""Timing benchmark: a tiny end-to-end run, and the fast conv path against the naive unfold path."""

import json
import sys

import pytest
import torch

from covguard.bench.timing import DetectorSpec, NaiveReference, _memory_child, detector_specs, max_relative_error, run_timing
from covguard.models import resnet20

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return resnet20(num_classes=4).eval()


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 16, 16, generator=gen)  # maps 16x16, 8x8, 4x4: every layer, small
    y = torch.arange(48) % 4
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 32, 16)], [x[32:]], torch.rand(6, 3, 16, 16, generator=gen)


@pytest.mark.parametrize(
    "spec",
    [DetectorSpec(kind, scoring, form, rank) for kind, scoring in [("simple", "-"), ("class", "top1"), ("class", "mixture")]
     for form, rank in [("full", 0), ("diag", 0), ("lowrank", 16)]],
    ids=lambda s: s.name,
)
def test_fast_path_matches_naive_unfold_in_float32(model, data, spec):
    """Accuracy guard: conv scoring (triangular full, 1x1 diagonal terms, fused norms) == (p-mu)^T P (p-mu)."""
    fit, holdout, x = data
    det = spec.build(model, ["layer1", "layer2", "layer3"]).fit(fit, holdout=holdout, progress=False)
    naive = NaiveReference(det)
    assert max_relative_error(det, naive, x) <= 1e-4
    maps = det.distance_maps(x)
    with torch.no_grad():
        logits, feats = det.forward(x)
    weights = naive.group_weights(logits)
    for layer in det.layers:  # every patch, not only the per-image means
        f = feats[layer]
        p = torch.nn.functional.unfold(f, 3).transpose(1, 2)  # (N, L, D)
        mean, P = naive.means[layer], naive.precisions[layer]
        d2 = torch.stack([((p - mean[k]) @ P[k] * (p - mean[k])).sum(-1) for k in range(mean.shape[0])], -1)  # (N, L, K)
        ref = d2[..., 0] if weights is None else (d2 * weights[:, None, :]).sum(-1)
        torch.testing.assert_close(maps[layer].flatten(1), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_naive_reference_scores_like_the_detector(model, data):
    fit, holdout, x = data
    det = DetectorSpec("class", "mixture", "lowrank", 8).build(model, ["layer2", "layer3"]).fit(fit, holdout=holdout, progress=False)
    torch.testing.assert_close(NaiveReference(det).score(x), det.score(x), rtol=1e-4, atol=1e-3)


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


def test_memory_job_reduced_class_statistics_runs(monkeypatch, capsys):
    """The subprocess entry point, run in-process at toy size (the real run spawns fresh interpreters)."""
    job = {"what": "class-reduced", "images": 12, "classes": 3, "layer": "layer4", "batch_size": 6, "rank": 8}
    monkeypatch.setattr(sys, "argv", ["-c", json.dumps(job)])
    _memory_child()
    assert json.loads(capsys.readouterr().out)["peak_rss_mb"] > 0


def test_cli_exposes_the_benchmark():
    from covguard.bench.timing import main
    from covguard.cli import build_parser

    args = build_parser().parse_args(["bench", "timing", "--quick", "--no-memory", "--models", "resnet20", "--out", "x"])
    assert args.func is main and args.quick and args.no_memory and args.models == ["resnet20"]
