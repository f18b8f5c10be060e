"""Distributed fit: two gloo processes on disjoint shards give the detector of all the data.

One ``torch.multiprocessing.spawn`` of two CPU processes runs every scenario in sequence (the
start-up dominates the cost); each rank writes what it got to a file that the test compares
with a single-process fit.
"""

import contextlib
import json
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_images

import covguard as cg
from covguard import stats
from covguard.stats import StreamingMoments, all_reduce_moments, batch_moments

WORLD = 2
RTOL = 1e-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loader(x, y, batch):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def data():
    """Training and held-out images split unevenly between the ranks; "all" holds the same batches.

    The single process sees exactly the batches the ranks see, in one thread as they run: float32
    activations are then bit-identical and, with every batch reduced on its own (:func:`merge_each_batch`),
    only the float64 merge differs.
    """
    x, y = make_images(240, seed=1)
    hold, hold_y = make_images(60, seed=2)
    cut, hcut = 150, 25
    shards = [
        (loader(x[:cut], y[:cut], 64), [(hold[:hcut], hold_y[:hcut])]),
        (loader(x[cut:], y[cut:], 64), [(hold[hcut:], hold_y[hcut:])]),
    ]
    return {"all": (shards[0][0] + shards[1][0], shards[0][1] + shards[1][1]), "shards": shards}


def merge_each_batch() -> None:
    """Reduce every batch on its own: chunks of held-back batches would differ between a rank and the
    single process, and float32 rounding with them (tests/test_stats.py checks chunked reductions)."""
    stats._PENDING_BYTES = 1


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build(model, kind):
    if kind == "simple":
        return cg.SimpleMahalanobis(model, layers=["block1", "block2"], covariance="full", fit_positions=1.0)
    return cg.ClassMahalanobis(
        model, layers=["block1", "block2"], covariance="lowrank", rank=6, scoring="mixture", top_m=2, fit_positions=1.0
    )


def worker(rank, port, model, out):
    torch.set_num_threads(1)
    merge_each_batch()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    report = {}
    try:
        shards = data()["shards"]
        train, hold = shards[rank]
        for kind in ("simple", "class"):  # distributed by default: the process group is initialized
            cg.save(build(model, kind).fit(train, holdout=hold, progress=False), f"{out}/{kind}-rank{rank}.safetensors")
        # an empty shard on rank 1 contributes nothing
        empty = build(model, "simple").fit(
            shards[0][0] if rank == 0 else [], holdout=shards[0][1] if rank == 0 else [], progress=False
        )
        cg.save(empty, f"{out}/empty-rank{rank}.safetensors")
        # a NaN on rank 1 raises on both ranks instead of leaving rank 0 waiting
        bad = [(b[0].clone(), b[1]) for b in train]
        if rank == 1:
            bad[1][0][0, 0, 0, 0] = float("nan")
        try:
            build(model, "simple").fit(bad, holdout=hold, progress=False)
        except Exception as err:  # noqa: BLE001 (recorded for the test to check)
            report["nan"] = f"{type(err).__name__}: {err}"
        # stats level: merging moments of float64 vectors
        x = (
            torch.randn(100 + 50 * rank, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)) * 3
            + 1e4
        )
        merged = all_reduce_moments(batch_moments(x))
        torch.save(
            {"n": merged.n, "mean": merged.mean, "scatter": merged.scatter, "x": x}, f"{out}/moments-rank{rank}.pt"
        )
        empty = StreamingMoments(5).all_reduce() if rank == 1 else StreamingMoments(5).update(x).all_reduce()
        report["empty_moments_n"] = empty.moments.n.item()
    finally:
        with open(f"{out}/report-rank{rank}.json", "w") as handle:
            json.dump(report, handle)
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def reference_merges_each_batch(monkeypatch):
    monkeypatch.setattr(stats, "_PENDING_BYTES", 1)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(free_port(), tiny_model, str(out)), nprocs=WORLD, join=True)
    return out


def precision(form):
    """Dense precision matrices (K, D, D) of a quadratic form."""
    P = torch.zeros(form.mean.shape[0], form.mean.shape[1], form.mean.shape[1], dtype=torch.float64)
    if form.proj is not None:
        P = P + torch.einsum("kdr,kr,ker->kde", form.proj, form.gain, form.proj)
    if form.diag is not None:
        P = P + torch.diag_embed(form.diag)
    return P


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_detector(got, ref):
    for layer in ref.layers:
        assert rel(got.forms_[layer].mean, ref.forms_[layer].mean) < RTOL
        assert rel(precision(got.forms_[layer]), precision(ref.forms_[layer])) < RTOL
    assert rel(got.score_mean_, ref.score_mean_) < RTOL and rel(got.score_std_, ref.score_std_) < RTOL


@pytest.mark.parametrize("kind", ["simple", "class"])
def test_two_processes_equal_one_process(tiny_model, runs, kind, images):
    train, hold = data()["all"]
    with one_thread():
        ref = build(tiny_model, kind).fit(train, holdout=hold, progress=False)
    rank0, rank1 = (runs / f"{kind}-rank{r}.safetensors" for r in range(WORLD))
    assert rank0.read_bytes() == rank1.read_bytes()  # every rank ends with the same detector
    got = cg.load(rank0, tiny_model)
    assert_same_detector(got, ref)
    x, _ = images
    torch.testing.assert_close(got.score(x[:40]), ref.score(x[:40]), rtol=1e-5, atol=1e-5)


def test_empty_shard_contributes_nothing(tiny_model, runs):
    train, hold = data()["shards"][0]
    with one_thread():
        ref = build(tiny_model, "simple").fit(train, holdout=hold, progress=False)
    assert_same_detector(cg.load(runs / "empty-rank1.safetensors", tiny_model), ref)


def test_failure_on_one_rank_raises_on_every_rank(runs):
    reports = [json.loads((runs / f"report-rank{r}.json").read_text()) for r in range(WORLD)]
    assert reports[1]["nan"] == "ValueError: activations of layer 'block1' in batch 1 on rank 1 contain NaN or inf"
    assert reports[0]["nan"] == "RuntimeError: fit failed on rank(s) [1] of 2; see the error raised there"
    assert reports[0]["empty_moments_n"] == reports[1]["empty_moments_n"] == 100


def test_all_reduce_moments_is_the_chan_merge(runs):
    parts = [torch.load(runs / f"moments-rank{r}.pt") for r in range(WORLD)]
    whole = batch_moments(torch.cat([p["x"] for p in parts]))
    for p in parts:
        assert p["n"].item() == 250
        assert rel(p["mean"], whole.mean) < 1e-14 and rel(p["scatter"], whole.scatter) < RTOL


def test_distributed_true_without_process_group_is_an_error(tiny_model, images):
    x, y = images
    with pytest.raises(ValueError, match="distributed=True needs an initialized torch.distributed process group"):
        build(tiny_model, "simple").fit(loader(x, y, 120), distributed=True, progress=False)
    from covguard.detectors.msp import MSP

    with pytest.raises(ValueError, match="MSP cannot fit distributed"):
        MSP(tiny_model).fit([x], distributed=True, progress=False)
