"""The validation protocol (OpenOOD v1.5): grids, seeded splits, selection, and tiny end-to-end runs of
``bench ood`` and ``bench adversarial`` on a synthetic data root built here."""

import copy
import json

import pytest
import torch
from conftest import make_images
from fake_root import build_root, train_tiny_net

import covguard.bench.ood as ood_bench
import covguard.bench.own_data as own_data
from covguard.bench.adversarial import AdversarialConfig, run_adversarial
from covguard.bench.common import CIFAR_LAYERS, VARIANTS
from covguard.bench.ood import OODConfig, run_ood
from covguard.bench.validation import (
    GRIDS, choose, grid_clones, grid_points, id_val_split, ood_val_split, point_label, report_config, select,
)
from covguard.detectors.knn import KNN
from covguard.detectors.baselines import BASELINES
from covguard.detectors.multi import fit_detectors
from covguard.metrics import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- grids, splits, selection ---------------------------------------------------------------


def test_grids_are_openood_sweeps_with_vim_adapted_and_our_variants():
    assert {k: v for k, v in GRIDS.items() if k in BASELINES} == {
        "msp": {},
        "max_logit": {},
        "energy": {"temperature": (1.0,)},
        "odin": {"temperature": (1.0, 10.0, 100.0, 1000.0), "noise": (0.0014, 0.0028)},
        "gen": {"gamma": (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0), "top_m": (10, 50, 100)},
        "mds": {},
        "rmds": {},
        "knn": {"k": (50, 100, 200, 500, 1000)},
        "vim": {"dim": (16, 32, 48)},  # adapted to 64-d features (OpenOOD: 256, 500, 1000 for 512-d)
        "react": {"percentile": (85.0, 90.0, 95.0, 99.0)},
    }
    assert set(BASELINES) < set(GRIDS)
    layers = ("all", *CIFAR_LAYERS)
    assert GRIDS["simple_mahalanobis"] == {
        "variant": (*(v for v in VARIANTS if v.startswith("simple/")), "simple/full/mean/normalized"), "layers": layers}
    assert GRIDS["class_mahalanobis"]["variant"] == (
        "class-top1/full/mean", "class-top1/full-oas/mean", "class-top1/diag/mean", "class-top1/lowrank-16/mean",
        "class-top1/lowrank-64/mean", "class-top1/full/max", "class-top1/full/top10", "class-mixture/full/mean",
        "class-top1/full/mean/relative", "class-top1/full/mean/fusion-max", "class-top1/full/mean/fusion-gaussian",
        "class-top1/full/mean/normalized",
    )
    assert GRIDS["class_penultimate_original"] == {}
    for grid in GRIDS.values():  # every grid value is a constructor parameter of the method (or ours)
        assert set(grid) <= {"variant", "layers", "temperature", "noise", "gamma", "top_m", "k", "dim", "percentile"}


def test_grid_points_are_the_product_in_order():
    points = grid_points(GRIDS["odin"])
    assert len(points) == 8 and points[0] == {"temperature": 1.0, "noise": 0.0014} and points[1]["noise"] == 0.0028
    assert grid_points({}) == [{}] and point_label({}) == "default"
    assert point_label(points[-1]) == "temperature=1000, noise=0.0028"
    assert len(grid_points(GRIDS["class_mahalanobis"])) == 12 * 5


def test_id_val_split_is_disjoint_and_reproducible():
    val, test = id_val_split(100, 30, seed=3)
    assert len(val) == 30 and len(test) == 70 and torch.equal(test, test.sort().values)
    assert sorted(torch.cat([val, test]).tolist()) == list(range(100))  # disjoint, covering
    assert torch.equal(id_val_split(100, 30, seed=3)[0], val)
    assert not torch.equal(id_val_split(100, 30, seed=4)[0], val)
    with pytest.raises(ValueError, match="n_id_val must be in"):
        id_val_split(100, 100, seed=0)


def test_ood_val_split_holds_out_whole_classes():
    labels = torch.arange(200).repeat_interleave(5)[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    val, test, classes = ood_val_split(labels, 20, seed=1)
    assert len(classes) == 20 and len(val) == 100 and len(test) == 900
    assert set(labels[val].tolist()) == set(classes.tolist())
    assert not set(labels[test].tolist()) & set(classes.tolist())  # no OOD-val class left in the test set
    assert sorted(torch.cat([val, test]).tolist()) == list(range(1000))
    assert torch.equal(ood_val_split(labels, 20, seed=1)[2], classes)
    assert not torch.equal(ood_val_split(labels, 20, seed=2)[2], classes)
    with pytest.raises(ValueError, match="labels must all be >= 0"):
        ood_val_split(torch.tensor([0, -1, 1]), 1, seed=0)


def test_select_takes_the_argmax_and_the_first_of_ties():
    assert select({"a": 0.6, "b": 0.9, "c": 0.7}) == "b"
    assert select({"a": 0.6, "b": 0.9, "c": 0.9}) == "b"
    with pytest.raises(ValueError):
        select({})


def test_choose_keeps_the_best_validation_auroc_and_grid_points_equal_fresh_fits(tiny_model, images):
    x, y = images
    fit = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    id_val, _ = make_images(60, seed=11)
    ood_val, _ = make_images(60, seed=12, shift=0.25)
    dets = {
        "msp": BASELINES["msp"](tiny_model), "gen": BASELINES["gen"](tiny_model), "odin": BASELINES["odin"](tiny_model),
        "knn": BASELINES["knn"](tiny_model), "react": BASELINES["react"](tiny_model, fc_layer="fc"),
    }
    clones = grid_clones(dets)
    assert sorted(clones) == [("react", "percentile=85"), ("react", "percentile=95"), ("react", "percentile=99")]
    fit_detectors([*dets.values(), *clones.values()], fit, progress=False)
    with pytest.warns(RuntimeWarning, match="exceeds the 240 fit images"):  # k = 500, 1000
        chosen = choose(dets, clones, holdout=None, id_val=id_val, ood_val=ood_val)
    assert list(chosen) == ["msp", "odin", "gen", "knn", "react"]  # GRIDS order
    for method, c in chosen.items():
        assert list(c.grid_auroc) == [point_label(p) for p in grid_points(GRIDS[method])]
        assert c.val_auroc == max(c.grid_auroc.values())
        assert point_label(c.config) == next(k for k, v in c.grid_auroc.items() if v == c.val_auroc)  # first argmax
    assert len(set(chosen["knn"].grid_auroc.values())) > 1  # the grid does change the score
    # Every grid point scores as a detector built and fitted with that setting from scratch.
    for method, point in (("knn", {"k": 100}), ("react", {"percentile": 85.0}), ("gen", {"gamma": 2.0, "top_m": 50})):
        fresh = type(dets[method])(tiny_model, **point, **({"fc_layer": "fc"} if method == "react" else {}))
        if fresh.requires_fit:
            fresh.fit(fit, progress=False)
        want = evaluate(fresh.score(id_val), fresh.score(ood_val)).auroc
        assert chosen[method].grid_auroc[point_label(point)] == pytest.approx(want, abs=1e-12)
    assert isinstance(chosen["knn"].detector, KNN)


# ---- tiny end-to-end runs on a synthetic data root -------------------------------------------

@pytest.fixture(scope="module")
def fake(tmp_path_factory, one_thread):
    """A synthetic data root and a tiny net trained on it, served as every benchmark checkpoint."""
    from covguard.data.registry import load_set

    root = build_root(tmp_path_factory.mktemp("data"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))
        train = load_set("cifar10_train", root, progress=False)
        model = train_tiny_net(train.float(), train.labels)  # 100 % accurate on these class colours
        load = lambda root, name, device="cpu", **kw: copy.deepcopy(model).to(device).eval()  # noqa: E731
        mp.setattr(own_data, "load_cifar_model", load)  # the default model source of both benchmarks
        yield root


COMMON = dict(models=("resnet20",), n_holdout=40, baselines=tuple(BASELINES), progress=False, n_id_val=20, n_ood_val_classes=5)


@pytest.fixture(scope="module")
def ood_run(fake, tmp_path_factory):
    out = tmp_path_factory.mktemp("ood")
    with pytest.warns(RuntimeWarning):  # KNN's k and ViM's dim clipped to the tiny fit set and 8-d features
        results = run_ood(fake, out, OODConfig(protocol="validation", n_noise=20, **COMMON))
    return results, out


def test_ood_validation_protocol_end_to_end(ood_run):
    results, out = ood_run
    split = results["validation_split"]
    assert split["id_val_images"] == 20 and split["ood_val_images"] == 10 and len(split["ood_val_classes"]) == 5
    assert results["n_images"]["cifar10_test"] == 80 and results["n_images"]["tin"] == 40  # val removed from the tests
    model = results["models"]["resnet20"]
    assert "metrics" not in model  # validation alone: no fixed-protocol tables
    selection = model["validation"]["selection"]
    assert list(selection) == list(GRIDS)  # every method, baselines included, chose (mixture is a class grid point)
    for method, sel in selection.items():
        assert sel["val_auroc"] == max(sel["grid_auroc"].values())
        assert len(sel["grid_auroc"]) == len(grid_points(GRIDS[method]))
    assert set(selection["class_mahalanobis"]["config"]) == {"variant", "layers"}
    assert "variant=class-top1/full/mean/normalized, layers=all" in selection["class_mahalanobis"]["grid_auroc"]
    assert set(model["validation"]["metrics"]["tin"]) == set(GRIDS)
    assert json.loads((out / "results.json").read_text())["config"]["protocol"] == "validation"
    md = (out / "results.md").read_text()
    assert "## Validation protocol (OpenOOD v1.5): chosen configuration per method" in md
    assert "## AUROC (higher is better), validation protocol (OpenOOD v1.5)" in md
    assert "fixed-in-advance" not in md and "| class_mahalanobis |" in md
    assert (out / "roc_tin.png").stat().st_size > 0 and (out / "hist_tin.png").stat().st_size > 0


def test_adversarial_uses_the_configurations_chosen_on_ood_validation(fake, ood_run, tmp_path):
    cfg = AdversarialConfig(protocol="both", attacks=("fgsm", "pgd"), eps=32 / 255, steps=2, n_images=1000,
                            sweep_eps=(16 / 255,), sweep_attacks=("fgsm",), **COMMON)
    with pytest.warns(RuntimeWarning):
        results = run_adversarial(fake, tmp_path, cfg)
    model = results["models"]["resnet20"]
    assert model["n_drawn"] == 80  # the 20 ID-val images are not in the pool the attacked images come from
    # Attacks choose nothing: the same choice as the OOD benchmark's, made on the same ID-val vs OOD-val.
    ood_selection = ood_run[0]["models"]["resnet20"]["validation"]["selection"]
    assert model["validation"]["selection"] == json.loads(json.dumps(ood_selection))
    assert set(model["metrics"]) == set(model["validation"]["metrics"]) and "mix" in model["metrics"]
    assert "class_mahalanobis_top1" in model["metrics"]["pgd"] and "class_mahalanobis" in model["validation"]["metrics"]["pgd"]
    assert set(model["sweep"]["16"]["fgsm"]["auroc"]) == set(model["metrics"]["fgsm"])
    assert set(model["validation"]["sweep"]["16"]["fgsm"]["auroc"]) == set(GRIDS)
    md = (tmp_path / "results.md").read_text()
    for heading in ("## AUROC (higher is better), fixed-in-advance protocol",
                    "## AUROC (higher is better), validation protocol (OpenOOD v1.5)",
                    "## AUROC against the L-inf budget, validation protocol (OpenOOD v1.5)",
                    "## Validation protocol (OpenOOD v1.5): chosen configuration per method"):
        assert heading in md


def test_adversarial_validation_protocol_alone(fake, tmp_path):
    cfg = AdversarialConfig(protocol="validation", attacks=("fgsm",), eps=32 / 255, n_images=30, **COMMON)
    with pytest.warns(RuntimeWarning):
        results = run_adversarial(fake, tmp_path, cfg)
    model = results["models"]["resnet20"]
    assert "metrics" not in model and "sweep" not in model and model["n_drawn"] == 30
    assert set(model["validation"]["metrics"]["fgsm"]) == set(GRIDS) == set(model["validation"]["selection"])
    md = (tmp_path / "results.md").read_text()
    assert "## FPR at 95% TPR (lower is better), validation protocol (OpenOOD v1.5)" in md and "fixed-in-advance" not in md
    assert (tmp_path / "roc_fgsm.png").stat().st_size > 0 and (tmp_path / "hist_fgsm.png").stat().st_size > 0


def test_fixed_protocol_report_keeps_its_old_config_and_headings(fake, tmp_path):
    cfg = AdversarialConfig(attacks=("fgsm",), eps=32 / 255, n_images=30, **{**COMMON, "baselines": ("msp",)})
    results = run_adversarial(fake, tmp_path, cfg)
    assert not {"protocol", "n_id_val", "n_ood_val_classes"} & set(results["config"])
    assert set(report_config(cfg)) == set(results["config"]) and "validation_split" not in results
    assert "validation" not in results["models"]["resnet20"] and results["models"]["resnet20"]["n_drawn"] == 30
    md = (tmp_path / "results.md").read_text()
    assert "## AUROC (higher is better)\n" in md and "protocol" not in md


def test_cli_passes_the_protocol(fake, monkeypatch, tmp_path):
    from covguard.cli import main

    seen = {}

    def fake_run(root, out, config, *, models=None, data=None):
        seen["config"] = config
        (tmp_path / "results.md").write_text("report")

    monkeypatch.setattr(ood_bench, "run_ood", fake_run)
    assert main(["bench", "ood", "--data", str(fake), "--out", str(tmp_path), "--protocol", "both"]) == 0
    assert seen["config"].protocol == "both"
    with pytest.raises(SystemExit):
        main(["bench", "adversarial", "--data", str(fake), "--protocol", "tuned"])
    with pytest.raises(ValueError, match="protocol must be one of"):
        run_ood(fake, tmp_path, OODConfig(protocol="tuned"))
