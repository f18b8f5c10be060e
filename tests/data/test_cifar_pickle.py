"""CIFAR python pickles read with the restricted unpickler (data/cifar.py), on tiny files built here."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from covguard.data import (
    CIFAR10_CLASSES,
    load_cifar10_pickle,
    load_cifar100_pickle,
    load_set,
)
from covguard.data.cifar import RestrictedUnpickler, restricted_load


def _dump(path, obj, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _cifar10(folder, rng, protocol=4, per_batch=3, meta=True):
    """cifar-10-batches-py with 5 train batches of ``per_batch`` images and a 4-image test batch."""
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", 4)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {b"batch_label": b"batch", b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}  # fmt: skip
        _dump(folder / name, batch, protocol)
        batches[name] = (data, labels)
    if meta:
        _dump(
            folder / "batches.meta",
            {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072},
            protocol,
        )
    return batches


def _planes(data: np.ndarray) -> torch.Tensor:
    """Independent decoding of CIFAR rows: R plane, G plane, B plane, each 32 rows of 32."""
    n = len(data)
    out = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            out[i, c] = data[i, c * 1024 : (c + 1) * 1024].reshape(32, 32)
    return torch.from_numpy(out)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickles_exact(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    batches = _cifar10(folder, np.random.default_rng(protocol), protocol=protocol)
    test = load_cifar10_pickle(folder, "test")
    data, labels = batches["test_batch"]
    assert torch.equal(test.images, _planes(data))
    assert test.labels.tolist() == labels and test.labels.dtype == torch.int64
    assert test.classes == CIFAR10_CLASSES and test.name == "cifar10_pickle_test"
    train = load_cifar10_pickle(folder, "train")
    all_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(train.images, _planes(all_data))
    assert train.labels.tolist() == [v for i in range(1, 6) for v in batches[f"data_batch_{i}"][1]]
    limited = load_cifar10_pickle(folder, "train", limit=5)
    assert torch.equal(limited.images, train.images[:5])


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING opcodes), as the official CIFAR files hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str8(self, obj):
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj
            if n < 256
            else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = _save_str8


def test_python2_style_pickle_with_numpy1_globals(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(
        {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4], b"data": data}
    )
    raw = buf.getvalue().replace(
        b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"
    )  # numpy-1 era name
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    (tmp_path / "test_batch").write_bytes(raw)
    got = load_cifar10_pickle(tmp_path, "test")
    assert got.labels.tolist() == [3, 1, 4] and torch.equal(got.images, _planes(data))


def test_cifar10_without_meta_uses_standard_names_and_str_keys_work(tmp_path):
    folder = tmp_path / "c10"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint32).astype(np.uint8).reshape(2, 3072)
    _dump(folder / "test_batch", {"data": data, "labels": np.array([9, 0])}, 4)  # str keys, array labels
    got = load_cifar10_pickle(folder, "test")
    assert got.classes == CIFAR10_CLASSES and got.labels.tolist() == [9, 0]
    assert torch.equal(got.images, _planes(data))


def test_cifar100_fine_and_coarse(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    fine, coarse = [0, 99, 42, 7, 3], [0, 19, 5, 1, 2]
    _dump(
        folder / "test", {b"data": data, b"fine_labels": fine, b"coarse_labels": coarse, b"filenames": []}, 2
    )
    names = [f"fine{i}".encode() for i in range(100)]
    _dump(
        folder / "meta",
        {b"fine_label_names": names, b"coarse_label_names": [b"c%d" % i for i in range(20)]},
        2,
    )
    got = load_cifar100_pickle(folder, "test")
    assert got.labels.tolist() == fine and got.classes[99] == "fine99" and len(got.classes) == 100
    assert torch.equal(got.images, _planes(data))
    sup = load_cifar100_pickle(folder, "test", label="coarse")
    assert sup.labels.tolist() == coarse and len(sup.classes) == 20
    via_registry = load_set("cifar100_pickle_test", tmp_path, cache_dir=tmp_path / "cache")
    assert torch.equal(via_registry.images, got.images)


class _Exploit:
    """Pickles to ``os.system(command)``: what a booby-trapped data file would contain."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_pickle_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    payload = {b"data": _Exploit(f"touch {marker}"), b"labels": [0]}
    _dump(folder / "test_batch", payload, 2)
    with pytest.raises(pickle.UnpicklingError, match=r"global '(posix|os|nt)\.system' is forbidden") as err:
        load_cifar10_pickle(folder, "test")
    assert "test_batch" in str(err.value)
    assert not marker.exists()
    # the plain unpickler would have run the command: the file really is an exploit
    with open(folder / "test_batch", "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize(
    "obj, name",
    [
        (_EvalExploit(), "builtins.eval"),
        (
            np.ma.masked_array([1, 2], mask=[0, 1]),
            "numpy.ma.core",
        ),  # ndarray subclass via its own reconstructor
        (__import__("collections").OrderedDict(a=1), "collections.OrderedDict"),
    ],
)
def test_restricted_unpickler_refuses_other_globals(tmp_path, obj, name):
    path = tmp_path / "f"
    _dump(path, obj, 4)
    with pytest.raises(pickle.UnpicklingError, match=f"global '{name}"):
        restricted_load(path)


def test_object_array_passes_the_unpickler_but_is_refused_as_data(tmp_path):
    _dump(tmp_path / "test_batch", {b"data": np.array([{"a": 1}], dtype=object), b"labels": [0]}, 4)
    with pytest.raises(ValueError, match="'data' must be a uint8 array"):
        load_cifar10_pickle(tmp_path, "test")


def test_codecs_encode_only_latin1(tmp_path):
    import io

    # protocol-2 bytes are `_codecs.encode(str, 'latin1')`; any other codec is refused
    crafted = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(pickle.UnpicklingError, match="encoding 'rot13' is not allowed"):
        RestrictedUnpickler(io.BytesIO(crafted)).load()
    ok = crafted.replace(b"X\x05\x00\x00\x00rot13", b"X\x06\x00\x00\x00latin1")
    assert RestrictedUnpickler(io.BytesIO(ok)).load() == b"abc"


def test_cifar_errors_name_the_file(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="lacks the CIFAR batch files"):
        load_cifar10_pickle(folder, "test")
    _dump(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, 4)
    with pytest.raises(ValueError, match=r"test_batch: 'data' must be a uint8 array of shape \(N, 3072\)"):
        load_cifar10_pickle(folder, "test")
    _dump(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8)}, 4)
    with pytest.raises(ValueError, match="missing key 'labels'"):
        load_cifar10_pickle(folder, "test")
    _dump(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, 4)
    with pytest.raises(ValueError, match=r"labels must be in 0..9"):
        load_cifar10_pickle(folder, "test")
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(pickle.UnpicklingError, match="test_batch"):
        load_cifar10_pickle(folder, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        load_cifar10_pickle(folder, "val")
    with pytest.raises(FileNotFoundError, match=r"'cifar10_pickle_test' .* expected '.*cifar-10-batches-py'"):
        load_set("cifar10_pickle_test", tmp_path / "nothing")
