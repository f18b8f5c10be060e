"""The frontier benchmark (bench/frontier*.py) end to end on the small fake data root: every variant
scored and timed, the report written; the default follows its rule."""

import json
import statistics

import pytest
import torch

from covguard.bench import frontier
from covguard.bench.frontier import BASIS, FORMS, KINDS, FrontierConfig, choose_default, run_frontier, sweep_name, variant_names
from covguard.models import cifar_resnet
from fake_root import build_root

pytestmark = pytest.mark.filterwarnings("ignore:classes .* have no fit samples:RuntimeWarning")  # random ResNet: few correct

CONFIG = FrontierConfig(
    models=("resnet20",), checkpoints="original", timing_models=("resnet20", "resnet18_32x32"), n_images=40, n_id_val=30,
    n_ood_val_classes=5, n_holdout=40, eps=64 / 255, steps=2, igm_scales=2, batch_sizes=(4, 1), repeats=1, max_calls=1, fit_batches=(1, 2),
    batch_size=32, progress=False, sweep_positions=(0.1,),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    root = build_root(tmp_path_factory.mktemp("data"))
    (root / "models").mkdir()
    torch.manual_seed(0)
    model = cifar_resnet("resnet20")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, root / "models" / "resnet20-fake.th")
    out = tmp_path_factory.mktemp("frontier")
    cfg = FrontierConfig(**{**CONFIG.__dict__, "cache_dir": str(tmp_path_factory.mktemp("cache"))})
    with pytest.MonkeyPatch.context() as mp:  # ResNet-18's four stages hold 4,608-d patches: time its first stage only
        mp.setitem(frontier.TIMING_LAYERS, "resnet18_32x32", ("layer1",))
        results = run_frontier(root, out, cfg)
        mp.setattr(frontier, "_variants", lambda *a: pytest.fail("resume fitted the variants again"))
        mp.setattr(frontier, "_sweep", lambda *a: pytest.fail("resume fitted the sweep again"))
        again = run_frontier(root, out, cfg, resume=True)
    return results, out, cfg, again


def test_every_variant_is_scored_and_timed(run):
    results, out, cfg, again = run
    names = variant_names()
    assert len(names) == len(KINDS) * len(FORMS) * 2 + len(BASIS)
    quality = results["models"]["resnet20"]["quality"]
    scored = [a for a in cfg.attacks if quality["attack_success_rate"][a] * quality["n_attacked"] >= 2]  # others skipped
    assert scored
    for name in names:
        per_set = quality["per_set"][name]
        assert set(per_set) == {"val", "cifar100", "tin", "mnist", "mnist_jpeg", *scored}
        assert all(0.0 <= v <= 1.0 for v in per_set.values())
        cats = quality["categories"][name]
        assert cats["near"] == pytest.approx(statistics.fmean([per_set["cifar100"], per_set["tin"]]))
        assert cats["adversarial"] == pytest.approx(statistics.fmean(per_set[a] for a in scored))
    for model in cfg.timing_models:
        timed = results["timing"][model]
        assert set(timed) == {n for n in names if "@" not in n}
        assert all(set(t) == {"4", "1"} for t in timed.values())
    for model in cfg.timing_models:
        assert {r["detector"] for r in results["fit"][model]} >= {f"{kind}/{results['default'][kind]['form']} positions=1"
                                                                  for kind in KINDS}
    for kind, d in results["default"].items():
        swept = results["models"]["resnet20"]["sweep"]["per_set"][sweep_name(kind, d["form"], 0.1)]
        assert set(swept) == {"val", "cifar100", "tin", "mnist", "mnist_jpeg", *scored}
        assert d["fit_positions"] in (1.0, cfg.fit_positions, 0.1)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["default"] == results["default"]
    text = (out / "results.md").read_text()
    assert "## The default" in text and "## Fit throughput" in text and "Shares of positions" in text and (out / "frontier.png").stat().st_size > 0


def _fake(val: dict[str, float], overhead: dict[str, float], positions_val: dict[str, float]) -> dict:
    cats = {}
    for kind in KINDS:
        for form in FORMS:
            cats[f"{kind}/{form}"] = {"val": val[form], "near": val[form], "far": val[form], "adversarial": val[form]}
            cats[f"{kind}/{form}@positions"] = {c: positions_val.get(form, 0.0) for c in ("val", "near", "far", "adversarial")}
    for form in BASIS:
        cats[f"class-top1/{form}"] = {c: val.get(form, 0.0) for c in ("val", "near", "far", "adversarial")}
    timing = {name: {str(max(CONFIG.batch_sizes)): overhead.get(name.split("/", 1)[1], 1.0)} for name in cats if "@" not in name}
    slow = {name: {str(max(CONFIG.batch_sizes)): 5.0} for name in timing}  # a timed model outside budget_models
    return {"models": {"m": {"quality": {"categories": cats}}}, "timing": {"resnet18_32x32": timing, "resnet20": slow}}


def test_default_is_the_best_validation_auroc_within_the_budget():
    val = {"full": 0.9, "full-oas": 0.91, "diag": 0.80, "lowrank-8": 0.82, "lowrank-16": 0.85, "lowrank-32": 0.88, "lowrank-64": 0.89}
    overhead = {"full": 1.0, "full-oas": 1.0, "diag": 0.03, "lowrank-8": 0.02, "lowrank-16": 0.04, "lowrank-32": 0.08, "lowrank-64": 0.12}
    chosen = choose_default(_fake(val, overhead, {"lowrank-32": 0.877}), CONFIG)
    assert chosen["simple"]["form"] == "lowrank-32"  # lowrank-64 is better but over 10 %; resnet20 does not bound
    assert chosen["simple"]["overhead_256"] == pytest.approx(0.08)
    assert chosen["simple"]["fit_positions"] == CONFIG.fit_positions  # 0.877 >= 0.88 - 0.005
    assert chosen["simple"]["delta_vs_full"]["val"] == pytest.approx(0.877 - 0.9)
    strict = choose_default(_fake(val, overhead, {"lowrank-32": 0.87}), CONFIG)
    assert strict["simple"]["fit_positions"] == 1.0 and strict["simple"]["val_auroc"] == pytest.approx(0.88)


def test_default_over_budget_everywhere_is_flagged():
    val = dict.fromkeys(FORMS, 0.5) | {"lowrank-8": 0.6}
    chosen = choose_default(_fake(val, {}, {}), CONFIG)
    assert chosen["simple"]["form"] == "lowrank-8" and not chosen["simple"]["within_budget"]


def test_config_refuses_bad_settings():
    for changes, field in (({"fit_positions": 1.0}, "fit_positions"), ({"models": ("vgg",)}, "models"),
                           ({"fit_batches": (3, 2)}, "fit_batches"), ({"timing_models": ("resnet50",)}, "timing_models")):
        with pytest.raises(ValueError, match=field):
            FrontierConfig(**{**CONFIG.__dict__, **changes}).check()
    with pytest.raises(ValueError, match="sweep_positions"):
        FrontierConfig(**{**CONFIG.__dict__, "sweep_positions": (0.5, 1.0)}).check()


def test_resume_reuses_the_measurements_of_the_same_settings(run):
    results, out, cfg, again = run
    assert again["models"] == results["models"] and again["default"] == results["default"]
    other = FrontierConfig(**{**cfg.__dict__, "n_images": cfg.n_images + 1})
    assert again["timing"] == results["timing"]  # same timing settings: reused
    assert frontier._stored(out, other) == ({}, {})  # other quality settings: measured again
    slower = FrontierConfig(**{**cfg.__dict__, "repeats": 3})
    assert frontier._stored(out, slower)[1] == {} and frontier._stored(out, slower)[0]  # timed again, quality kept


def test_default_takes_the_smallest_share_of_positions_within_tolerance_on_validation():
    val = dict.fromkeys(FORMS, 0.8) | {"diag": 0.9}
    results = _fake(val, {"diag": 0.01}, {"diag": 0.899})
    results["models"]["m"]["sweep"] = {"categories": {sweep_name("simple", "diag", 0.1): dict.fromkeys(("val", "near", "far", "adversarial"), 0.897),
                                                      sweep_name("simple", "diag", 0.05): dict.fromkeys(("val", "near", "far", "adversarial"), 0.89)}}
    cfg = FrontierConfig(**{**CONFIG.__dict__, "sweep_positions": (0.1, 0.05)})
    chosen = choose_default(results, cfg)["simple"]
    assert chosen["form"] == "diag" and chosen["fit_positions"] == 0.1  # 0.05 is 1 point below exact: over the tolerance
    assert chosen["variant"] == sweep_name("simple", "diag", 0.1) and chosen["val_auroc"] == pytest.approx(0.897)
