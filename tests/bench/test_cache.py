"""The suite's on-disk tensor cache (bench/cache.py): same parts hit, a changed part misses, a
corrupted entry is ignored with a warning and recomputed."""

import pytest
import torch
from safetensors import safe_open

from covguard.bench.cache import TensorCache, cache_key, default_suite_cache_dir, tensor_sha256


class Counting:
    """compute() for TensorCache.get that counts its calls."""

    def __init__(self, value: float = 1.0) -> None:
        self.calls, self.value = 0, value

    def __call__(self):
        self.calls += 1
        return {"scores": torch.full((4,), self.value, dtype=torch.float64), "ok": torch.tensor([True, False])}


PARTS = {"weights": "a" * 64, "data": "b" * 64, "settings": {"n_holdout": 200, "eps": 8 / 255}}


def test_same_parts_hit_in_a_new_cache_object(tmp_path):
    compute = Counting()
    first = TensorCache(tmp_path).get("scores", PARTS, compute)
    cache = TensorCache(tmp_path)
    again = cache.get("scores", dict(PARTS), Counting(2.0))  # equal parts, another dict: a hit
    assert compute.calls == 1 and (cache.hits, cache.misses) == (1, 0)
    assert torch.equal(again["scores"], first["scores"]) and again["ok"].dtype == torch.bool
    assert again["scores"].dtype == torch.float64


@pytest.mark.parametrize(
    "change",
    [
        {"weights": "c" * 64},  # another checkpoint
        {"data": "d" * 64},  # other images
        {"settings": {"n_holdout": 201, "eps": 8 / 255}},  # another setting
        {"settings": {"n_holdout": 200, "eps": 2 / 255}},
    ],
)
def test_a_changed_part_misses(tmp_path, change):
    cache = TensorCache(tmp_path)
    cache.get("scores", PARTS, Counting())
    other = Counting(3.0)
    out = cache.get("scores", {**PARTS, **change}, other)
    assert other.calls == 1 and (cache.hits, cache.misses) == (0, 2)
    assert out["scores"][0].item() == 3.0
    assert len(list((tmp_path / "scores").glob("*.safetensors"))) == 2


def test_kinds_are_separate(tmp_path):
    cache = TensorCache(tmp_path)
    cache.get("scores", PARTS, Counting())
    assert cache.load("attacks", PARTS) is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_entry_is_ignored_with_a_warning_and_recomputed(tmp_path, damage):
    cache = TensorCache(tmp_path)
    cache.get("scores", PARTS, Counting())
    path = cache.path("scores", PARTS)
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00\xff" * 50, "empty": b""}[damage])
    again = Counting(5.0)
    with pytest.warns(UserWarning, match="ignoring unreadable cache entry"):
        out = TensorCache(tmp_path).get("scores", PARTS, again)
    assert again.calls == 1 and out["scores"][0].item() == 5.0
    hit = TensorCache(tmp_path)
    assert hit.get("scores", PARTS, Counting(9.0))["scores"][0].item() == 5.0 and hit.hits == 1  # rewritten


def test_entry_of_another_key_in_the_same_file_is_a_miss(tmp_path):
    cache = TensorCache(tmp_path)
    other_parts = {**PARTS, "data": "e" * 64}
    cache.get("scores", other_parts, Counting())
    # a file name collision (24 hex digits) cannot return another key's tensors
    cache.path("scores", other_parts).rename(cache.path("scores", PARTS))
    assert cache.load("scores", PARTS) is None


def test_metadata_records_the_full_key_and_parts(tmp_path):
    cache = TensorCache(tmp_path)
    cache.get("scores", PARTS, Counting())
    with safe_open(str(cache.path("scores", PARTS)), framework="pt") as f:
        meta = f.metadata()
    assert meta["key"] == cache_key(PARTS) and '"n_holdout": 200' in meta["parts"]


def test_disabled_cache_always_computes_and_writes_nothing(tmp_path):
    cache = TensorCache(tmp_path, enabled=False)
    compute = Counting()
    cache.get("scores", PARTS, compute)
    cache.get("scores", PARTS, compute)
    assert compute.calls == 2 and not any(tmp_path.iterdir())


def test_default_folder_follows_covguard_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COVGUARD_CACHE", str(tmp_path))
    assert default_suite_cache_dir() == tmp_path / "suite"
    assert TensorCache().folder == tmp_path / "suite"


def test_tensor_sha256_sees_values_dtype_and_shape():
    x = torch.arange(6, dtype=torch.uint8)
    assert tensor_sha256(x) == tensor_sha256(x.clone())
    assert tensor_sha256(x) != tensor_sha256(x.reshape(2, 3))
    assert tensor_sha256(x) != tensor_sha256(x.to(torch.int64))
    y = x.clone()
    y[3] += 1
    assert tensor_sha256(x) != tensor_sha256(y)


def test_bad_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kind must be a plain folder name"):
        TensorCache(tmp_path).path("../x", PARTS)
