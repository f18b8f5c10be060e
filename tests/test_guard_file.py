"""Hostile guard files (issue 14, causes 1-3 and the loading items of the minor list).

Every bad file must end in one documented error, :class:`GuardFileError` (a ValueError), whose
message names the real cause, and never in a KeyError, TypeError, RecursionError, a huge
allocation or a "model does not match" for a file that was damaged.
"""

import copy
import json
import os
import struct

import pytest
import torch
from conftest import make_images
from forge import contents, forge, pack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import covguard as cg
from covguard.guardfile import MAX_HEADER_BYTES
from covguard.persistence import GuardFileError, read_metadata

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    x, _ = make_images(240, seed=1)
    det = cg.SimpleMahalanobis(tiny_model, layers=["block1", "block2"], covariance="lowrank", rank=6, fit_positions=1.0)
    det.fit([x[:120], x[120:]], progress=False)
    guard = cg.Guard(tiny_model, det)
    guard.calibration_ = cg.guard.Calibration(threshold=1.5, tpr=0.95, n=100, achieved_tpr=0.95)
    return guard.save(tmp_path_factory.mktemp("guardfile") / "guard.safetensors")


def header_span(raw):
    (size,) = struct.unpack("<Q", raw[:8])
    return 8, 8 + size


# ---- cause 1: metadata parsed before it is verified ------------------------------------------


def test_bit_flip_in_the_word_threshold_is_corruption_not_a_key_error(tiny_model, saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    at = raw.index(b"threshold")
    raw[at] ^= 0x01  # "uhreshold"
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(GuardFileError, match="is corrupted: its checksum does not match its content"):
        cg.load_guard(bad, tiny_model)
    with pytest.raises(GuardFileError, match="is corrupted"):
        read_metadata(bad)


def test_deeply_nested_header_is_refused_without_recursion_error(tiny_model, tmp_path):
    for text in (b"[" * 100_000, b'{"a":' * 50_000):
        bad = tmp_path / "deep.safetensors"
        bad.write_bytes(struct.pack("<Q", len(text)) + text)
        with pytest.raises(GuardFileError, match="nests deeper than 8 levels"):
            cg.load(bad, tiny_model)


def test_oversized_header_is_refused_before_it_is_read(tiny_model, tmp_path):
    bad = tmp_path / "big-header.safetensors"
    bad.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 8) + b" " * (MAX_HEADER_BYTES + 8))
    with pytest.raises(GuardFileError, match="headers are at most 1048576 bytes"):
        cg.load(bad, tiny_model)


@FUZZ
@given(data=st.data())
def test_fuzzed_headers_give_one_error_type(tiny_model, saved, tmp_path_factory, data):
    raw = bytearray(saved.read_bytes())
    begin, end = header_span(raw)
    kind = data.draw(st.sampled_from(["flip", "bytes", "truncate", "length"]))
    if kind == "flip":
        at = data.draw(st.integers(0, end - 1))
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "bytes":
        at = data.draw(st.integers(begin, end - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        raw[at : at + len(chunk)] = chunk
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    bad = tmp_path_factory.mktemp("fuzz") / "g.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        guard = cg.load_guard(bad, tiny_model)
    except GuardFileError as err:
        assert "model" not in str(err).split(":")[0], err  # never blames the model for a damaged file
    else:  # a change that JSON parsing undoes (e.g. in padding) must not change anything
        assert guard.calibration_.threshold == 1.5


# ---- cause 2: files with a valid checksum are trusted ----------------------------------------------


def edit_json(key, function):
    return {"edit": (key, function)}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (edit_json("input_shape", lambda v: v.__setitem__(1, -32)), r"input_shape \[1, -32, 8\] must be an integer"),
        (edit_json("input_shape", lambda v: v.__setitem__(slice(1, 3), [60000, 60000])), "exceeds 4096 channels or 4194304 pixels"),
        ({"tensors": {"forms/block1/mean": torch.zeros(1, 27, dtype=torch.float64)}}, r"'forms/block1/mean' has shape \(1, 27\); expected \(1, 36\)"),
        ({"drop": ["forms/block2/gain"]}, "the forms tensors of layer 'block2' are missing"),
        (edit_json("hyperparameters", lambda v: v.update(bogus=1)), "hyperparameters that SimpleMahalanobis refuses"),
        (edit_json("hyperparameters", lambda v: v.update(kernel_size={"block1": 3, "block2": 2.7})), "kernel_size of layer 'block2'"),
        (edit_json("hyperparameters", lambda v: v.update(eps="0.01")), "hyperparameters that SimpleMahalanobis refuses"),
        ({"tensors": {"standardize/std": torch.tensor([float("nan"), 1.0], dtype=torch.float64)}}, "'standardize/std' holds NaN or inf"),
        ({"tensors": {"forms/block2/diag": torch.full((1, 54), float("inf"), dtype=torch.float64)}}, "'forms/block2/diag' holds NaN or inf"),
        ({"tensors": {"standardize/mean": torch.zeros(2)}}, "'standardize/mean' must be float64; got torch.float32"),
        ({"tensors": {"standardize/std": torch.zeros(2, dtype=torch.float64)}}, "'standardize/std' must be positive"),
        ({"tensors": {"extra": torch.zeros(1, dtype=torch.float64)}}, r"unexpected tensors \['extra'\]"),
        (edit_json("model", lambda v: v.pop("parameters_sha256")), "fingerprint must hold layers"),
        (edit_json("model", lambda v: v["channels"].update(block1=5)), r"has shape \(1, 36\); expected \(1, 45\)"),
        (edit_json("calibration", lambda v: v.pop("n")), "calibration must hold exactly"),
        (edit_json("calibration", lambda v: v.update(threshold=float("inf"))), "holds Infinity, which is not a JSON number"),
        (edit_json("calibration", lambda v: v.update(tpr=2)), r"calibration tpr must be in \(0, 1\]"),
        ({"meta": {"detector": "bogus"}}, "detector 'bogus' is not one of"),
        ({"meta": {"detector": "knn"}}, "detector 'knn' is written in format version 3, not 2"),
        ({"meta": {"hyperparameters": "[" * 20 + "]" * 20}}, "hyperparameters nests deeper than 8 levels"),
        ({"meta": {"extra": "1"}}, r"metadata keys missing \[\], unknown \['extra'\]"),
    ],
)
def test_checksummed_edits_are_refused_by_the_schema(tiny_model, saved, tmp_path, change, match):
    bad = forge(saved, tmp_path / "edited.safetensors", **change)
    with pytest.raises(GuardFileError, match=match):
        cg.load_guard(bad, tiny_model)


def test_format_1_and_a_missing_checksum_are_refused_not_warned(tiny_model, saved, tmp_path):
    v1 = forge(saved, tmp_path / "v1.safetensors", meta={"format_version": "1"}, checksummed=False)
    with pytest.raises(GuardFileError, match="format version 1, which has no checksum"):
        cg.load(v1, tiny_model)
    plain = forge(saved, tmp_path / "plain.safetensors", drop=["format_version"], checksummed=False)
    with pytest.raises(GuardFileError, match="is not a covguard detector file"):
        cg.load(plain, tiny_model)


def test_unedited_file_still_loads_after_forging_round_trip(tiny_model, saved, tmp_path, images):
    same = forge(saved, tmp_path / "same.safetensors")
    assert same.read_bytes() == saved.read_bytes()  # the forge helper reproduces the writer
    assert torch.equal(cg.load(same, tiny_model).score(images[0][:4]), cg.load(saved, tiny_model).score(images[0][:4]))


# ---- cause 3: sizes bounded -----------------------------------------------------------------------


def test_appended_bytes_are_refused_from_the_header_alone(tiny_model, saved, tmp_path):
    bad = tmp_path / "appended.safetensors"
    bad.write_bytes(saved.read_bytes())
    with bad.open("r+b") as handle:  # a sparse 3 GiB tail: never read
        handle.truncate(saved.stat().st_size + 3 * 1024**3)
    with pytest.raises(GuardFileError, match=r"is 3221\d+ bytes \(3.0 GiB\) long but its header describes"):
        cg.load(bad, tiny_model)
    with pytest.raises(GuardFileError, match=r"larger than the limit of 1048576 bytes \(1.0 MiB\)"):
        cg.load(bad, tiny_model, max_bytes=1024**2)


# ---- minor items -------------------------------------------------------------------------------


def test_model_none_is_a_type_error(saved):
    with pytest.raises(TypeError, match="model must be the torch.nn.Module the detector was fitted on; got NoneType"):
        cg.load_guard(saved, None)
    with pytest.raises(TypeError, match="got NoneType"):
        cg.load(saved, None)


def test_float64_copy_of_the_fitted_model_is_the_same_model(tiny_model, saved, images):
    double = copy.deepcopy(tiny_model).double()
    guard = cg.load_guard(saved, double)
    scores = guard(images[0][:5].double()).scores
    torch.testing.assert_close(scores.float(), cg.load_guard(saved, tiny_model)(images[0][:5]).scores, rtol=1e-4, atol=1e-4)
    half = copy.deepcopy(tiny_model).half()  # rounded weights: a different model, and the message says which dtypes
    with pytest.raises(ValueError, match="model parameters differ .*converting the model's torch.float16 floats"):
        cg.load_guard(saved, half)


def test_saved_files_follow_the_umask(tiny_model, saved, tmp_path):
    det = cg.load(saved, tiny_model)
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            path = cg.save(det, tmp_path / f"d{mask:o}.safetensors")
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == mode


def test_pack_helper_matches_header_format(saved):
    meta, _ = contents(saved)
    raw = saved.read_bytes()
    begin, end = header_span(raw)
    assert pack(json.loads(raw[begin:end]), raw[end:]) == raw and "checksum" in meta
