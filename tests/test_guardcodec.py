"""Baseline and fused detector files (format 3): bit-identical round trips, the layout, and the
schema and model refusals; format 2 patch files from the previous writer still load."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TinyCNN, make_images
from forge import contents, forge
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import covguard as cg
from covguard.detectors import BASELINES, DETECTORS, FusedDetector
from covguard.detectors.energy import Energy
from covguard.detectors.knn import KNN
from covguard.detectors.mds import MDS
from covguard.detectors.msp import MSP
from covguard.detectors.react import ReAct
from covguard.detectors.rmds import RMDS
from covguard.detectors.vim import ViM
from covguard.guard import Calibration
from covguard.persistence import GuardFileError, read_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

V2_FILE = Path(__file__).parent / "files" / "guard_v2_class_mahalanobis.safetensors"
PARAMS = {"knn": {"k": 5}, "vim": {"dim": 3}, "react": {"percentile": 80.0}, "energy": {"temperature": 2.0},
          "odin": {"temperature": 10.0, "noise": 0.01}, "gen": {"gamma": 0.5, "top_m": 2}}  # fmt: skip


@pytest.fixture(scope="module")
def data(images):
    x, y = images
    return {"train": [(x[i : i + 60], y[i : i + 60]) for i in range(0, 120, 60)], "cal": [x[120:180]], "test": x[180:]}


@pytest.fixture(scope="module")
def baselines(tiny_model, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: cls(tiny_model, **PARAMS.get(name, {})).fit(data["train"], progress=False) for name, cls in BASELINES.items()}


def fused_members(model, **changes):
    members = {"simple": cg.SimpleMahalanobis(model, layers=["block1", "block2"], covariance="full", fit_positions=1.0), "mds": MDS(model), "rmds": RMDS(model),
               "knn": KNN(model, k=5), "vim": ViM(model, dim=3), "react": ReAct(model), "msp": MSP(model), "energy": Energy(model)}  # fmt: skip
    return {**members, **changes}


@pytest.fixture(scope="module")
def fused_guard(tiny_model, data, tmp_path_factory):
    x, _ = make_images(60, seed=5)
    fused = FusedDetector(fused_members(tiny_model), rule="minp", tail_size=7)
    fused.fit(data["train"], calibration=data["cal"], progress=False)
    with pytest.warns(UserWarning, match="calibrating on 60 images"):
        guard = cg.Guard(tiny_model, fused).calibrate([x], tpr=0.9, progress=False)
    return guard, guard.save(tmp_path_factory.mktemp("fused") / "fused.safetensors")


@pytest.fixture(scope="module")
def saved_knn(baselines, tmp_path_factory):
    return cg.save(baselines["knn"], tmp_path_factory.mktemp("knn") / "knn.safetensors")


# ---- round trips -------------------------------------------------------------------------------


def test_every_baseline_is_registered_for_persistence():
    assert {name: DETECTORS[name] for name in BASELINES} == BASELINES and DETECTORS["fused"] is FusedDetector


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_guard_round_trip_scores_bit_identically(tiny_model, baselines, data, name, tmp_path):
    det = baselines[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few calibration images
        guard = cg.Guard(tiny_model, det).calibrate(data["cal"], tpr=0.9, progress=False)
    loaded = cg.load_guard(guard.save(tmp_path / f"{name}.safetensors"), tiny_model)
    assert type(loaded.detector) is type(det) and loaded.detector.get_params() == det.get_params()
    assert loaded.calibration_ == guard.calibration_ and loaded.detector.input_shape_ == (1, 8, 8)
    before, after = guard(data["test"]), loaded(data["test"])
    assert torch.equal(after.scores, before.scores) and torch.equal(after.flagged, before.flagged)
    saved, again = det.state_tensors(), loaded.detector.state_tensors()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_baseline_file_layout(baselines, saved_knn, tmp_path):
    meta, tensors = contents(saved_knn)
    assert meta["format_version"] == "3" and meta["detector"] == "knn" and "covariance" not in meta
    assert json.loads(meta["hyperparameters"]) == {"k": 5, "feature_layer": "avgpool"}
    assert json.loads(meta["model"])["layers"] == ["avgpool"] and json.loads(meta["model"])["channels"] == {"avgpool": 6}
    assert list(tensors) == ["bank"] and tensors["bank"].shape == (120, 6) and tensors["bank"].dtype == torch.float32
    _, vim = contents(cg.save(baselines["vim"], tmp_path / "vim.safetensors"))
    assert {k: tuple(t.shape) for k, t in vim.items()} == {"alpha": (), "bias": (3,), "origin": (6,), "residual_basis": (6, 3), "weight": (3, 6)}
    assert cg.save(baselines["knn"], tmp_path / "again.safetensors").read_bytes() == saved_knn.read_bytes()


def test_stateless_baseline_saves_hyperparameters_only(tiny_model, data, tmp_path):
    unfitted = Energy(tiny_model, temperature=3.0)  # needs no fit: no input shape recorded
    path = cg.save(unfitted, tmp_path / "energy.safetensors")
    meta, tensors = contents(path)
    assert tensors == {} and meta["input_shape"] == "null" and json.loads(meta["model"])["layers"] == []
    loaded = cg.load(path, tiny_model)
    assert loaded.temperature == 3.0 and torch.equal(loaded.score(data["test"]), unfitted.score(data["test"]))


def test_fused_guard_round_trip_scores_bit_identically(tiny_model, fused_guard, data):
    guard, path = fused_guard
    loaded = cg.load_guard(path, tiny_model)
    fused = loaded.detector
    assert isinstance(fused, FusedDetector) and list(fused.members) == list(guard.detector.members)
    assert (fused.rule, fused.tail_size, fused.input_shape_) == ("minp", 7, (1, 8, 8))
    assert all(type(fused.members[n]) is type(d) for n, d in guard.detector.members.items())
    assert all(torch.equal(fused.calibration_[n], c) for n, c in guard.detector.calibration_.items())
    assert fused.tail_scales_ == guard.detector.tail_scales_ and loaded.calibration_ == guard.calibration_
    before, after = guard(data["test"]), loaded(data["test"])
    assert torch.equal(after.scores, before.scores) and torch.equal(after.flagged, before.flagged)
    member_before, member_after = guard.detector.members_scores(data["test"]), fused.members_scores(data["test"])
    assert all(torch.equal(member_after[n], s) for n, s in member_before.items())
    assert isinstance(cg.load(path, tiny_model), FusedDetector)  # the same file as a plain detector


def test_fused_file_layout(fused_guard):
    meta, tensors = contents(fused_guard[1])
    params = json.loads(meta["hyperparameters"])
    assert meta["format_version"] == "3" and meta["detector"] == "fused" and (params["rule"], params["tail_size"]) == ("minp", 7)
    assert [m["name"] for m in params["members"]] == ["simple", "mds", "rmds", "knn", "vim", "react", "msp", "energy"]
    assert params["members"][3] == {"name": "knn", "detector": "knn", "hyperparameters": {"k": 5, "feature_layer": "avgpool"}}
    assert json.loads(meta["model"])["layers"] == ["block1", "block2", "avgpool"]
    assert {"members/simple/forms/block1/mean", "members/simple/standardize/std", "members/knn/bank", "members/vim/alpha"} <= set(tensors)
    cal = tensors["calibration/knn"]
    assert cal.dtype == torch.float64 and cal.shape == (60,) and torch.equal(cal, cal.sort().values)
    assert {k.split("/")[1] for k in tensors if k.startswith("calibration/")} == {m["name"] for m in params["members"]}


def test_format_2_file_of_the_previous_writer_loads_and_saves_to_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN().eval()  # the seeded model the file was fitted on (other torch versions: other weights)
    assert read_metadata(V2_FILE)["format_version"] == "2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        guard = cg.load_guard(V2_FILE, model, strict_model=False)
    assert isinstance(guard.detector, cg.ClassMahalanobis) and guard.calibration_.tpr == 0.9
    assert guard.detector.fit_positions == 1.0 != cg.ClassMahalanobis(model, layers=["block1"]).fit_positions  # file value, not default
    assert guard.save(tmp_path / "again.safetensors").read_bytes() == V2_FILE.read_bytes()
    assert torch.isfinite(guard(make_images(8, seed=2)[0]).scores).all()


@pytest.mark.filterwarnings("ignore:member .* has 3 calibration scores")
def test_save_refuses_what_it_cannot_write(tiny_model, baselines):
    nested = FusedDetector({"inner": FusedDetector({"msp": MSP(tiny_model)}).set_calibration({"msp": torch.arange(3.0)})})
    nested.set_calibration({"inner": torch.arange(3.0)})
    with pytest.raises(TypeError, match="member 'inner' is a FusedDetector"):
        cg.save(nested, "never.safetensors")
    slash = FusedDetector({"a/b": MSP(tiny_model)}).set_calibration({"a/b": torch.arange(3.0)})
    with pytest.raises(ValueError, match="member names must hold no '/'"):
        cg.save(slash, "never.safetensors")
    with pytest.raises(cg.NotFittedError):
        cg.save(KNN(tiny_model), "never.safetensors")
    knn = KNN(tiny_model, k=2)
    knn.partial_fit(torch.randn(4, 3), {"avgpool": torch.randn(4, 6, 1, 1)}).finish_fit()
    with pytest.raises(ValueError, match="KNN recorded no input shape"):
        cg.save(knn, "never.safetensors")
    assert not Path("never.safetensors").exists()


# ---- schema refusals (checksum recomputed: the schema catches them) -------------------------------


def f64(*shape, value=0.0):
    return torch.full(shape, value, dtype=torch.float64)


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("knn", {"tensors": {"bank": torch.zeros(4, 5)}}, r"tensor 'bank' has shape \(4, 5\); expected \(M, C\) with C=6 from the model's channel count"),
        ("knn", {"tensors": {"bank": torch.zeros(4, 6, dtype=torch.float64)}}, "tensor 'bank' must be torch.float32; got torch.float64"),
        ("knn", {"tensors": {"bank": torch.full((4, 6), float("nan"))}}, "tensor 'bank' holds NaN or inf"),
        ("knn", {"tensors": {"bank": torch.full((4, 6), 2.0)}}, "tensor 'bank' must hold L2-normalized rows"),
        ("knn", {"tensors": {"bank": torch.zeros(0, 6)}}, r"tensor 'bank' has shape \(0, 6\)"),
        ("knn", {"drop": ["bank"]}, r"state tensors missing \['bank'\], unexpected \[\]"),
        ("knn", {"tensors": {"extra": torch.zeros(1)}}, r"unexpected \['extra'\]"),
        ("knn", {"edit": ("hyperparameters", lambda v: v.update(k=0))}, "has hyperparameters that KNN refuses: k must be >= 1"),
        ("knn", {"edit": ("hyperparameters", lambda v: v.update(feature_layer="block2"))}, "feature_layer 'block2' must be a layer of the model fingerprint"),
        ("knn", {"edit": ("model", lambda v: v.update(layers=["avgpool", "block1"]))}, r"model channels must give a count for each layer"),
        ("knn", {"meta": {"input_shape": "null"}}, "input_shape must be"),
        ("knn", {"meta": {"format_version": "2"}}, "detector 'knn' is written in format version 3, not 2"),
        ("mds", {"tensors": {"classes": torch.tensor([2, 1, 0])}}, "tensor 'classes' must hold increasing labels"),
        ("mds", {"tensors": {"classes": torch.tensor([0.0, 1.0, 2.0])}}, "tensor 'classes' must be torch.int64"),
        ("mds", {"tensors": {"means": f64(3, 2)}}, r"tensor 'means' has shape \(3, 2\); expected \(K', r\) with r=\d from tensor 'whitening'"),
        ("rmds", {"tensors": {"background_mean": f64(2, 6)}}, r"tensor 'background_mean' has shape \(2, 6\); expected \(1, r0\)"),
        ("rmds", {"drop": ["background_whitening"]}, r"state tensors missing \['background_whitening'\]"),
        ("vim", {"tensors": {"alpha": torch.tensor(float("inf"), dtype=torch.float64)}}, "tensor 'alpha' holds NaN or inf"),
        ("vim", {"tensors": {"residual_basis": f64(6, 6)}}, "tensor 'residual_basis' must have fewer than C=6 columns"),
        ("vim", {"tensors": {"bias": f64(4)}}, r"tensor 'bias' has shape \(4,\); expected \(K,\) with K=3 from tensor 'weight'"),
        ("react", {"tensors": {"threshold": f64(1)}}, r"tensor 'threshold' has shape \(1,\); expected \(\)"),
        ("msp", {"tensors": {"bank": torch.zeros(1)}}, r"state tensors missing \[\], unexpected \['bank'\]"),
        ("msp", {"edit": ("hyperparameters", lambda v: v.update(temperature=2))}, "has hyperparameters that MSP refuses"),
    ],
)
def test_checksummed_baseline_edits_are_refused(tiny_model, baselines, tmp_path, name, change, match):
    bad = forge(cg.save(baselines[name], tmp_path / "ok.safetensors"), tmp_path / "bad.safetensors", **change)
    with pytest.raises(GuardFileError, match=match):
        cg.load(bad, tiny_model)


def edit_members(function):
    return {"edit": ("hyperparameters", lambda v: function(v["members"]))}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tensors": {"members/knn/bank": torch.zeros(120, 5)}}, r"member 'knn' \(knn\): tensor 'bank' has shape \(120, 5\); expected \(M, C\) with C=6"),
        ({"tensors": {"members/simple/forms/block1/mean": f64(1, 27)}}, r"member 'simple' \(simple_mahalanobis\): tensor 'forms/block1/mean' has shape \(1, 27\)"),
        ({"tensors": {"members/vim/residual_basis": f64(5, 3)}}, r"member 'vim' \(vim\): tensor 'residual_basis' has shape \(5, 3\)"),
        ({"drop": ["members/mds/means"]}, r"member 'mds' \(mds\): state tensors missing \['means'\]"),
        ({"drop": ["calibration/knn"]}, "tensor 'calibration/knn' is missing"),
        ({"tensors": {"calibration/msp": f64(60).flip(0) + torch.arange(60.0, dtype=torch.float64).flip(0)}}, "'calibration/msp' must be sorted ascending"),
        ({"tensors": {"calibration/msp": torch.tensor([0.0, float("nan")], dtype=torch.float64)}}, "'calibration/msp' holds NaN or inf"),
        ({"tensors": {"calibration/msp": f64(1)}}, r"'calibration/msp' must be 1-D float64 with n >= 2 scores"),
        ({"tensors": {"members/ghost/bank": torch.zeros(1, 6)}}, r"unexpected tensors \['members/ghost/bank'\]"),
        ({"edit": ("hyperparameters", lambda v: v.update(rule="mean"))}, "rule must be one of"),
        ({"edit": ("hyperparameters", lambda v: v.update(tail_size=0))}, r"tail_size must be an integer in \[1,"),
        ({"edit": ("hyperparameters", lambda v: v.pop("rule"))}, "must hold exactly members, rule, tail_size"),
        (edit_members(lambda m: m[1].update(name="knn")), "member names must be distinct"),
        (edit_members(lambda m: m[1].update(name="a/b")), "member names must be distinct non-empty strings without '/'"),
        (edit_members(lambda m: m[0].update(detector="fused")), "member 'simple' must name a detector of"),
        (edit_members(lambda m: m[6].update(detector="odin", hyperparameters={})), "members that FusedDetector refuses: members \\['msp'\\] override score"),
        (edit_members(lambda m: m[3]["hyperparameters"].update(k=-1)), "member 'knn' with hyperparameters that KNN refuses"),
        (edit_members(lambda m: m.pop(3)), r"unexpected tensors \['calibration/knn', 'members/knn/bank'\]"),
        ({"edit": ("model", lambda v: v.update(layers=["block1", "avgpool", "block2"]))}, "model fingerprint layers .* are not those the detector taps"),
    ],
)
def test_checksummed_fused_edits_are_refused_naming_the_member(tiny_model, fused_guard, tmp_path, change, match):
    bad = forge(fused_guard[1], tmp_path / "bad.safetensors", **change)
    with pytest.raises(GuardFileError, match=match):
        cg.load_guard(bad, tiny_model)


def test_unchecksummed_edit_of_a_fused_file_is_corruption(tiny_model, fused_guard, tmp_path):
    raw = bytearray(fused_guard[1].read_bytes())
    raw[-3] ^= 0x10  # a bit of the last tensor
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(GuardFileError, match="is corrupted: its checksum does not match its content"):
        cg.load_guard(bad, tiny_model)


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 130) | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@FUZZ
@given(data=st.data())
def test_fuzzed_fused_hyperparameters_give_one_error_type(tiny_model, fused_guard, tmp_path_factory, data):
    """Checksummed files with a member entry, rule or tail size replaced by arbitrary JSON: loaded
    as they were, or refused with a GuardFileError (never a KeyError, TypeError, ...)."""
    meta, _ = contents(fused_guard[1])
    params = json.loads(meta["hyperparameters"])
    where = data.draw(st.sampled_from(["rule", "tail_size", "members", "member", "member_key"]))
    value = data.draw(JSON)
    if where in ("rule", "tail_size", "members"):
        params[where] = value
    else:
        at = data.draw(st.integers(0, len(params["members"]) - 1))
        if where == "member":
            params["members"][at] = value
        else:
            params["members"][at][data.draw(st.sampled_from(["name", "detector", "hyperparameters"]))] = value
    bad = forge(fused_guard[1], tmp_path_factory.mktemp("fuzz") / "f.safetensors", meta={"hyperparameters": json.dumps(params)})
    try:
        cg.load_guard(bad, tiny_model)
    except GuardFileError as err:
        assert "model" not in str(err).split(":")[0], err


@FUZZ
@given(data=st.data())
def test_fuzzed_fused_file_bytes_give_one_error_type(tiny_model, fused_guard, tmp_path_factory, data):
    raw = bytearray(fused_guard[1].read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    bad = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        guard = cg.load_guard(bad, tiny_model)
    except GuardFileError as err:
        assert "model" not in str(err).split(":")[0], err
    else:  # a flip that JSON parsing undoes (in the header's padding)
        assert guard.calibration_ == fused_guard[0].calibration_


# ---- model checks ----------------------------------------------------------------------------------


def test_models_that_do_not_match_are_refused(baselines, fused_guard, saved_knn, tmp_path):
    torch.manual_seed(0)
    four_classes = TinyCNN(num_classes=4)
    vim = cg.save(baselines["vim"], tmp_path / "vim.safetensors")
    with pytest.raises(ValueError, match="model does not match the saved detector: it has 4 classes, the detector's saved head 3"):
        cg.load(vim, four_classes, strict_model=False)
    two_classes = TinyCNN(num_classes=2)
    mds = cg.save(baselines["mds"], tmp_path / "mds.safetensors")
    with pytest.raises(ValueError, match="it has 2 classes, the detector has means of labels up to 2"):
        cg.load(mds, two_classes, strict_model=False)
    with pytest.raises(ValueError, match="model does not match the saved detector: member 'vim': it has 4 classes"):
        cg.load_guard(fused_guard[1], four_classes, strict_model=False)
    wide = TinyCNN()
    wide.block2[1] = torch.nn.Conv2d(4, 7, 3, padding=1)
    wide.fc = torch.nn.Linear(7, 3)
    with pytest.raises(ValueError, match=r"model does not match the saved detector \('avgpool': fitted C=6, model C=7\)"):
        cg.load(saved_knn, wide, strict_model=False)
    headless = torch.nn.Sequential()
    headless.add_module("avgpool", torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ValueError, match=r"model does not match the saved detector: its fc_layers \['fc'\] are not modules"):
        cg.load(vim, headless, strict_model=False)


def test_fine_tuned_model_loads_a_fused_guard_only_when_told(tiny_model, fused_guard, data):
    tuned = TinyCNN()
    tuned.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        tuned.fc.bias += 1e-3
    with pytest.raises(ValueError, match="model parameters differ"):
        cg.load_guard(fused_guard[1], tuned.eval())
    with pytest.warns(RuntimeWarning, match="model parameters differ"):
        guard = cg.load_guard(fused_guard[1], tuned.eval(), strict_model=False)
    assert torch.isfinite(guard(data["test"]).scores).all()


def test_calibration_is_checked_for_fused_guards_too(tiny_model, fused_guard, tmp_path):
    bad = forge(fused_guard[1], tmp_path / "cal.safetensors", edit=("calibration", lambda v: v.update(n=0)))
    with pytest.raises(GuardFileError, match="calibration n must be a positive integer"):
        cg.load_guard(bad, tiny_model)
    assert Calibration.from_dict(json.loads(read_metadata(fused_guard[1])["calibration"])).tpr == 0.9


@pytest.mark.parametrize(
    "options",
    [{"fusion": "gaussian"}, {"relative": True}, {"aggregate": "topq", "top_fraction": 0.2, "normalize": "position"}],
    ids=["gaussian-fusion", "relative", "topq-normalized"],
)
def test_detector_variants_round_trip_bit_identically(tiny_model, images, tmp_path, options):
    x, y = images
    det = cg.ClassMahalanobis(tiny_model, layers=["block1", "block2"], **{"covariance": "full", "fit_positions": 1.0, **options})
    det.fit([(x[:160], y[:160])], holdout=[x[160:]], progress=False)
    loaded = cg.load(cg.save(det, tmp_path / "variant.safetensors"), tiny_model)
    assert loaded.get_params() == det.get_params()
    assert torch.equal(loaded.score(x[:20]), det.score(x[:20]))


def test_default_options_are_not_written(tiny_model, images, tmp_path):
    x, y = images
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1"], covariance="full", fit_positions=1.0).fit([x[:160]], progress=False)
    params = json.loads(read_metadata(cg.save(det, tmp_path / "d.safetensors"))["hyperparameters"])
    assert not {"top_fraction", "normalize", "fusion", "relative", "keep_moments"} & set(params)
