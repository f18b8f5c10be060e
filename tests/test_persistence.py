"""Detector files: safetensors + JSON metadata, reproducible bytes, and every refusal of covguard.load."""

import copy
import json
import pickle
import struct

import pytest
import torch
from conftest import TinyCNN, make_images
from safetensors import safe_open
from safetensors.torch import save_file

import covguard as cg
from covguard.features import parameter_sha256
from covguard.persistence import FORMAT_VERSION, GuardFileError, read_metadata
from forge import contents, forge


def loader(x, y, batch=80):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def fit(model, seed=1, **kwargs):
    x, y = make_images(240, seed=seed)
    params = {"layers": ["block1", "block2"], "covariance": "lowrank", "rank": 6, "fit_positions": 1.0, **kwargs}
    return cg.ClassMahalanobis(model, **params).fit(loader(x, y), progress=False)


def header(raw):
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), 8 + size


def rewrite(raw, change):
    """A copy of a file with its JSON header changed by ``change(header)`` (tensor bytes kept)."""
    head, start = header(raw)
    change(head)
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[start:]


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("persist") / "det.safetensors"
    return cg.save(fit(tiny_model), path)


def test_same_seed_and_data_give_identical_bytes(tiny_model, saved, tmp_path):
    again = cg.save(fit(tiny_model), tmp_path / "again.safetensors")
    assert again.read_bytes() == saved.read_bytes()
    other = cg.save(fit(tiny_model, seed=2), tmp_path / "other.safetensors")
    assert other.read_bytes() != saved.read_bytes()


def test_metadata_describes_detector_model_and_versions(tiny_model, saved):
    meta = read_metadata(saved)
    assert FORMAT_VERSION == 3 and meta["covguard_version"] == cg.__version__
    assert meta["format_version"] == "2"  # patch detector files keep format 2: older covguards read them
    assert meta["detector"] == "class_mahalanobis" and meta["covariance"] == "lowrank" and meta["aggregation"] == "mean"
    model = json.loads(meta["model"])
    assert model == {
        "layers": ["block1", "block2"],
        "channels": {"block1": 4, "block2": 6},
        "parameters_sha256": parameter_sha256(tiny_model),
    }
    assert json.loads(meta["input_shape"]) == [1, 8, 8] and "calibration" not in meta
    with safe_open(str(saved), framework="pt") as handle:  # a plain safetensors file for other tools
        assert handle.metadata() == meta
        assert sorted(handle.keys())[:3] == ["forms/block1/diag", "forms/block1/gain", "forms/block1/mean"]


def test_round_trip_scores_identically(tiny_model, saved, images):
    x, _ = images
    loaded = cg.load(saved, tiny_model)
    assert torch.equal(loaded.score(x[:30]), fit(tiny_model).score(x[:30]))


def test_parameter_hash_depends_on_every_tensor(tiny_model):
    model = copy.deepcopy(tiny_model)
    before = parameter_sha256(model)
    assert parameter_sha256(copy.deepcopy(tiny_model)) == before
    model.block1[1].running_var[0] += 1e-6  # a buffer, not a parameter
    assert parameter_sha256(model) != before


def test_refuses_model_with_other_parameters_unless_told(tiny_model, saved, images):
    tuned = copy.deepcopy(tiny_model)
    with torch.no_grad():
        tuned.fc.weight[0, 0] += 1e-3
    with pytest.raises(
        ValueError, match="model parameters differ from those the detector .* was fitted on .*strict_model=False"
    ):
        cg.load(saved, tuned)
    with pytest.warns(RuntimeWarning, match="model parameters differ"):
        det = cg.load(saved, tuned, strict_model=False)
    assert torch.isfinite(det.score(images[0][:5])).all()


def test_refuses_model_with_other_layers(saved):
    class Renamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = TinyCNN()

        def forward(self, x):
            return self.stem(x)

    with pytest.raises(
        ValueError, match=r"model does not match the saved detector: its tapped layers \['block1', 'block2'\]"
    ):
        cg.load(saved, Renamed())


def test_refuses_newer_format(tiny_model, saved, tmp_path):
    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(rewrite(saved.read_bytes(), lambda h: h["__metadata__"].update(format_version="99")))
    with pytest.raises(ValueError, match="has format version 99, newer than this covguard reads"):
        cg.load(newer, tiny_model)
    with pytest.raises(ValueError, match="has format version 99"):
        read_metadata(newer)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_refuses_truncated_file(tiny_model, saved, tmp_path, keep):
    raw = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ValueError, match="not a readable safetensors file, or it is truncated or corrupted"):
        cg.load(cut, tiny_model)


def test_refuses_corrupted_tensor_bytes_and_metadata(tiny_model, saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    flipped = bytearray(raw)
    flipped[len(raw) - 100] ^= 0x01  # one bit of one tensor: safetensors alone would not notice
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is corrupted: its checksum does not match its content"):
        cg.load(bad, tiny_model)
    bad.write_bytes(rewrite(bytes(raw), lambda h: h["__metadata__"].update(aggregation="max")))
    with pytest.raises(ValueError, match="is corrupted: its checksum"):
        cg.load(bad, tiny_model)


def test_refuses_missing_tensors(tiny_model, saved, tmp_path):
    for key, match in [
        ("forms/block2/mean", "the forms tensors of layer 'block2' are missing"),
        ("standardize/std", "tensor 'standardize/std' is missing"),
    ]:
        path = forge(saved, tmp_path / "missing.safetensors", drop=[key])  # checksum recomputed
        with pytest.raises(GuardFileError, match=match):
            cg.load(path, tiny_model)


def test_format_1_files_are_refused(tiny_model, saved, tmp_path):
    meta, tensors = contents(saved)
    v1 = {key: meta[key] for key in ("covguard_version", "detector", "hyperparameters", "input_shape")}
    v1.update(format_version="1", channels=json.dumps(json.loads(meta["model"])["channels"]))
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata=v1)
    with pytest.raises(GuardFileError, match="has format version 1, which has no checksum or model fingerprint"):
        cg.load(path, tiny_model)


def test_loading_never_unpickles(tiny_model, saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("covguard unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert isinstance(cg.load(saved, tiny_model), cg.ClassMahalanobis)


def test_save_is_atomic_and_leaves_no_temporary_files(tiny_model, saved, tmp_path):
    det = cg.load(saved, tiny_model)
    path = cg.save(det, tmp_path / "sub" / "d.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["d.safetensors"]
