"""The suite (bench/suite*.py) end to end on a small fake data root, its summaries by hand, the
fused scores against FusedDetector, and the cache: a second run fits nothing and gives the same
numbers, a changed setting recomputes only what depends on it."""

import gzip
import json
import math
import struct
import tarfile

import numpy as np
import pytest
import torch

from covguard.bench.suite import run_suite
from covguard.bench.suite_config import DERIVED, FUSED_MEMBERS, HEADLINE, SHORTCUT, SuiteConfig, fused_detectors
from covguard.bench.suite_metrics import category_metrics, fuse, summarize, with_fused
from covguard.bench.suite_report import overall
from covguard.data.cifar import CIFAR10_CLASSES
from covguard.models import cifar_resnet
from fake_root import add_member, jpeg_bytes

pytestmark = pytest.mark.filterwarnings("ignore:classes .* have no fit samples:RuntimeWarning")  # random ResNet: few correct

CIFAR_CATEGORIES = ("cifar100", "tin", "mnist", "mnist_jpeg", "uniform_noise", "gaussian_noise", "blank")


# --- a fake data root: every file the suite reads, small -----------------------------------------


def _jpeg(array: np.ndarray) -> bytes:
    return jpeg_bytes(array, quality=75)


def _class_image(rng, k: int) -> np.ndarray:
    """A 32x32 RGB image whose colour and stripe period depend on the class k (plus noise)."""
    colour = np.array([(37 * k) % 256, (91 * k + 40) % 256, (53 * k + 100) % 256], dtype=np.float64)
    stripes = (np.arange(32) // (k + 2) % 2)[None, :, None] * 60.0
    img = colour[None, None, :] * 0.7 + stripes + rng.normal(0, 20, size=(32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _cifar_tar(path, split: str, per_class: int, rng) -> None:
    with tarfile.open(path, "w") as tar:
        for k, cls in enumerate(CIFAR10_CLASSES):
            for i in range(per_class):
                add_member(tar, f"{split}/{cls}/{i:04d}.jpg", _jpeg(_class_image(rng, k)))


def _idx(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite-data")
    rng = np.random.default_rng(0)
    (root / "cifar10-jpeg").mkdir()
    _cifar_tar(root / "cifar10-jpeg" / "train.tar", "train", 30, rng)
    _cifar_tar(root / "cifar10-jpeg" / "test.tar", "test", 6, rng)
    with tarfile.open(root / "cifar100-jpeg.tar", "w") as tar:  # the loader wants all 100 class folders
        for c in range(100):
            add_member(tar, f"cifar100-jpeg/test/class{c:03d}/0000.jpg", _jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    with tarfile.open(root / "tiny-imagenet-200-val.tar", "w") as tar:
        lines = []
        for i in range(30):
            add_member(tar, f"tiny-imagenet-200/val/images/val_{i}.JPEG", _jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
            lines.append(f"val_{i}.JPEG\tn0{i % 3}\t0\t0\t63\t63")
        add_member(tar, "tiny-imagenet-200/wnids.txt", b"n00\nn01\nn02\n")
        add_member(tar, "tiny-imagenet-200/val/val_annotations.txt", ("\n".join(lines) + "\n").encode())
    (root / "mnist").mkdir()
    digits = np.zeros((30, 28, 28), np.uint8)
    digits[:, 8:20, 12:16] = 255
    (root / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(digits)))
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(30) % 10)))
    (root / "models").mkdir()
    torch.manual_seed(0)
    model = cifar_resnet("resnet20")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, root / "models" / "resnet20-fake.th")
    return root


CONFIG = SuiteConfig(
    models=("resnet20",), n_images=30, n_holdout=40, n_calibration=40, baselines=("msp", "odin", "mds", "rmds", "knn", "vim"),
    steps=2, igm_scales=2, shortcut=True, timing_images=16, timing_repeats=1, batch_size=64, progress=False,
)


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """The suite run twice with the same settings (the second from the cache), then with another small eps
(without the shortcut model, which does not depend on it)."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("cache")
    cfg = SuiteConfig(**{**CONFIG.__dict__, "cache_dir": str(cache)})
    first_out, second_out = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    first = run_suite(data_root, first_out, cfg)
    second = run_suite(data_root, second_out, cfg)
    changed_cfg = SuiteConfig(**{**cfg.__dict__, "small_eps": 4 / 255, "shortcut": False})
    changed = run_suite(data_root, tmp_path_factory.mktemp("changed"), changed_cfg)
    return {"first": first, "second": second, "changed": changed, "out": first_out, "cfg": cfg}


def test_every_category_and_detector_is_scored(runs):
    first, cfg = runs["first"], runs["cfg"]
    model = first["models"]["resnet20"]
    attacks = ("fgsm_8", "bim_8", "pgd_8", "pgd_l2_0.5", "igm_8", "fgsm_2", "pgd_2")
    assert list(first["categories"]) == [*CIFAR_CATEGORIES, *attacks, *SHORTCUT]
    detectors = {"simple_mahalanobis", "class_mahalanobis_top1", "class_penultimate_original", *DERIVED, *cfg.baselines, *fused_detectors()}
    for cat in CIFAR_CATEGORIES:
        assert set(model["metrics"][cat]) == detectors
        assert model["metrics"][cat][HEADLINE]["n_in"] == 30
    assert model["metrics"]["blank"]["knn"]["n_out"] == 30
    for cat in attacks:  # a random ResNet is fooled by every attack: each category is scored
        m = model["metrics"][cat]["mds"]
        assert m["n_in"] == m["n_out"] <= model["n_attacked"]
    assert model["n_fit"] == 300 - 40 - 40 and model["n_calibration"] == 40
    shortcut = first["shortcut"]
    assert set(shortcut["metrics"]) == set(SHORTCUT)
    assert shortcut["n_calibration"] == 40 and shortcut["n_images"]["clean"] == 60
    assert shortcut["metrics"]["shortcut_removed"]["msp"]["n_out"] == 12  # airplane + automobile test images
    for source in (model, shortcut):
        for per_det in source["metrics"].values():
            for m in per_det.values():
                assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["detection_at_5fpr"] <= 1.0
    timing = model["timing"]
    assert set(timing) == set(FUSED_MEMBERS)
    assert timing["fused_ours_knn_mds"]["costliest"] in FUSED_MEMBERS["fused_ours_knn_mds"]
    assert timing["fused_ours_knn_mds"]["ratio"] > 0


def test_report_files(runs):
    out = runs["out"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["resnet20"]["metrics"]["tin"]["knn"]["auroc"] == runs["first"]["models"]["resnet20"]["metrics"]["tin"]["knn"]["auroc"]
    text = (out / "results.md").read_text()
    assert "## AUROC per category" in text and "## Detection rate at 5% FPR per category" in text
    assert f"| {HEADLINE} (headline, fixed in advance) |" in text and "| class_mahalanobis_top1 (ours) |" in text
    assert "## Targets" in text and "## Cost of fused scoring" in text
    for png in ("heatmap_auroc.png", "heatmap_detection.png"):
        assert (out / png).stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert "heatmap_auroc.png" in html and "results.json" in html


def test_overall_mean_and_worst_match_the_per_checkpoint_metrics(runs):
    first = runs["first"]
    table = first["overall"]["table"][HEADLINE]
    cats = first["overall"]["categories"]
    by_hand = {}
    for cat in cats:
        source = first["shortcut"] if cat in SHORTCUT else first["models"]["resnet20"]
        by_hand[cat] = source["metrics"][cat][HEADLINE]["auroc"]
    assert table["auroc"] == pytest.approx(by_hand)
    assert table["summary_auroc"]["mean"] == pytest.approx(sum(by_hand.values()) / len(by_hand))
    worst = min(by_hand, key=by_hand.get)
    assert table["summary_auroc"]["worst_category"] == worst and table["summary_auroc"]["worst"] == by_hand[worst]


def test_second_run_reads_everything_from_the_cache(runs):
    first, second = runs["first"], runs["second"]
    m1, m2 = first["models"]["resnet20"], second["models"]["resnet20"]
    assert m1["fitted_this_run"] and m1["cache"]["hits"] == 0
    assert not m2["fitted_this_run"] and m2["cache"]["misses"] == 0 and m2["cache"]["hits"] == m1["cache"]["misses"]
    assert m2["metrics"] == m1["metrics"] and m2["timing"] == m1["timing"]
    assert not second["shortcut"]["fitted_this_run"] and second["shortcut"]["metrics"] == first["shortcut"]["metrics"]


def test_a_changed_attack_budget_recomputes_only_what_depends_on_it(runs):
    first, changed = runs["first"]["models"]["resnet20"], runs["changed"]["models"]["resnet20"]
    assert "fgsm_4" in changed["metrics"] and "fgsm_2" not in changed["metrics"]
    assert changed["fitted_this_run"]  # new adversarials need the detectors again
    # two attacks and their scores are new; the OOD sets, the 8/255 attacks and the timing hit
    assert changed["cache"]["misses"] == 4
    for cat in (*CIFAR_CATEGORIES, "pgd_8"):
        assert changed["metrics"][cat] == first["metrics"][cat]


# --- pure pieces ------------------------------------------------------------------------------


def test_summarize_mean_and_worst():
    s = summarize({"a": 0.9, "b": 0.6, "c": None, "d": 0.75})
    assert s == {"mean": pytest.approx(0.75), "worst": 0.6, "worst_category": "b", "n_categories": 3}
    empty = summarize({"a": None})
    assert math.isnan(empty["mean"]) and empty["worst_category"] is None


def _fake_results():
    def metrics(values):
        return {cat: {det: {"auroc": v, "detection_at_5fpr": v / 2} for det, v in per.items()} for cat, per in values.items()}

    return {
        "config": {"baselines": ["knn"]},
        "categories": {"tin": "near", "pgd_8": "adversarial", "shortcut_moved": "shortcut"},
        "models": {
            "a": {"metrics": metrics({"tin": {"knn": 0.8, HEADLINE: 0.9}, "pgd_8": {"knn": 0.4, HEADLINE: 1.0}})},
            "b": {"metrics": metrics({"tin": {"knn": 0.6, HEADLINE: 0.7}, "pgd_8": {"knn": 0.6, HEADLINE: 0.9}})},
        },
        "shortcut": {"metrics": metrics({"shortcut_moved": {"knn": 0.3, HEADLINE: 0.5}})},
    }


def test_overall_averages_checkpoints_then_categories():
    summary = overall(_fake_results())
    assert summary["detectors"] == [HEADLINE, "knn"] and summary["categories"] == ["tin", "pgd_8", "shortcut_moved"]
    knn = summary["table"]["knn"]
    assert knn["auroc"] == pytest.approx({"tin": 0.7, "pgd_8": 0.5, "shortcut_moved": 0.3})
    assert knn["auroc_std"]["tin"] == pytest.approx(np.std([0.8, 0.6], ddof=1)) and knn["auroc_std"]["shortcut_moved"] == 0.0
    assert knn["summary_auroc"]["mean"] == pytest.approx(0.5) and knn["summary_auroc"]["worst_category"] == "shortcut_moved"
    head = summary["table"][HEADLINE]
    assert head["summary_auroc"]["mean"] == pytest.approx((0.8 + 0.95 + 0.5) / 3)
    assert head["summary_detection"]["worst"] == pytest.approx(0.25)


def test_fuse_equals_fused_detector(tiny_model, images, one_thread):
    from covguard.detectors.fused import FusedDetector
    from covguard.detectors.knn import KNN
    from covguard.detectors.mds import MDS
    from covguard.detectors.msp import MSP

    x, y = images
    members = {"msp": MSP(tiny_model), "knn": KNN(tiny_model, k=5, feature_layer="avgpool"), "mds": MDS(tiny_model)}
    fused = FusedDetector(members, rule="fisher")
    fused.fit([(x[:160], y[:160])], calibration=[x[160:200]], progress=False)
    cal = {name: det.score(x[160:200]) for name, det in members.items()}
    raw = {name: det.score(x[200:]) for name, det in members.items()}
    for rule in ("fisher", "minp"):
        want = FusedDetector(members, rule=rule).set_calibration(cal).combine(raw)
        got = fuse(raw, cal, list(members), rule=rule)
        torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=1e-6)


def test_with_fused_adds_every_fused_detector_and_category_metrics_reads_5_percent_fpr():
    gen = torch.Generator().manual_seed(0)
    names = {m for members in FUSED_MEMBERS.values() for m in members}
    s_in = {n: torch.randn(200, generator=gen) for n in names}
    s_out = {n: torch.randn(100, generator=gen) + 3 for n in names}
    cal = {n: torch.randn(300, generator=gen) for n in names}
    fin, fout = with_fused(s_in, cal), with_fused(s_out, cal)
    assert set(fin) == names | set(fused_detectors())
    m = category_metrics(fin, fout)
    for det in names:
        threshold = torch.quantile(s_in[det].double(), 0.95)  # flags 10 of 200 negatives (5 %)
        want = (s_out[det].double() > threshold).double().mean().item()
        assert m[det]["detection_at_5fpr"] == pytest.approx(want, abs=0.011)
    assert m[HEADLINE]["auroc"] > max(m[d]["auroc"] for d in FUSED_MEMBERS["fused_ours_knn_mds"]) - 0.02


def test_config_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match=r"baselines must include \['knn'\]"):
        SuiteConfig(baselines=("mds",)).check()
    with pytest.raises(ValueError, match="small_eps_attacks must be L-inf"):
        SuiteConfig(small_eps_attacks=("pgd_l2",)).check()
    with pytest.raises(ValueError, match="n_calibration must be >= 2"):
        SuiteConfig(n_calibration=1).check()
    with pytest.raises(ValueError, match="eps must be > 0"):
        run_suite(tmp_path, tmp_path / "out", SuiteConfig(eps=0.0))


def test_cli_builds_the_config(monkeypatch, tmp_path):
    from covguard import commands
    from covguard.cli import main

    seen = {}
    monkeypatch.setattr("covguard.bench.suite.run_suite", lambda root, out, config: seen.update(config=config))
    monkeypatch.setattr(commands, "_data_root", lambda value: tmp_path)
    (tmp_path / "results.md").write_text("ok")
    assert main(["bench", "suite", "--out", str(tmp_path), "--models", "resnet20", "--n-images", "50", "--shortcut",
                 "--small-eps", "4", "--no-cache", "--no-progress"]) == 0
    cfg = seen["config"]
    assert cfg.models == ("resnet20",) and cfg.n_images == 50 and cfg.shortcut and not cfg.cache
    assert cfg.small_eps == 4 / 255 and cfg.eps == SuiteConfig().eps
