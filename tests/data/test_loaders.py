"""Real-data loaders on small files built here: folders, tars, imglists, IDX, SVHN, Tiny ImageNet, cache."""

import gzip
import io
import logging
import os
import struct
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import covguard.data.images as images_mod
from covguard.data import (
    ImageSet,
    cached,
    data_root,
    jpeg_matched,
    load_image_folder,
    load_image_tar,
    load_imglist,
    load_mnist,
    load_set,
    load_svhn,
    load_tiny_imagenet_val,
    read_idx,
    read_imglist,
)

CLASSES = ("airplane", "cat", "dog")  # created below in another order: labels must follow sorted names


def _rng_image(rng, h=32, w=32, channels=3):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _pil_reference(array: np.ndarray, size=32) -> np.ndarray:
    """OpenOOD's test transform written out independently: RGB, Resize(size) bilinear, CenterCrop(size)."""
    img = Image.fromarray(array).convert("RGB")
    w, h = img.size
    if min(w, h) != size:
        if w <= h:
            img = img.resize((size, int(size * h / w)), Image.BILINEAR)
        else:
            img = img.resize((int(size * w / h), size), Image.BILINEAR)
    w, h = img.size
    top, left = round((h - size) / 2), round((w - size) / 2)
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _chw(array_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array_hwc.transpose(2, 0, 1)))


@pytest.fixture
def folder(tmp_path):
    """root/<class>/<i>.png with 3 classes x 4 random RGB images; returns (root, {relpath: array})."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    arrays = {}
    for cls in ("dog", "airplane", "cat"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            a = _rng_image(rng)
            (root / cls / f"{i:04d}.png").write_bytes(_png(a))
            arrays[f"{cls}/{i:04d}.png"] = a
    (root / "notes.txt").write_text("not an image, not in a class folder")
    return root, arrays


def _tar(folder_root, path, mode="w", arcprefix="train", reverse=True):
    """Tar the folder with members in reverse sorted order (the loader must sort them back)."""
    files = sorted(p for p in folder_root.rglob("*") if p.is_file())
    with tarfile.open(path, mode) as tar:
        for p in reversed(files) if reverse else files:
            tar.add(p, arcname=f"{arcprefix}/{p.relative_to(folder_root).as_posix()}")
    return path


def _expected(arrays):
    keys = sorted(arrays)
    images = torch.stack([_chw(arrays[k]) for k in keys])
    labels = torch.tensor([CLASSES.index(k.split("/")[0]) for k in keys])
    return images, labels


# --- ImageSet -----------------------------------------------------------------------------------


def test_imageset_float_is_pixels_over_255_and_dataset_pairs():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    data = ImageSet(x, torch.arange(5), classes=tuple("abcde"), name="t", source="here")
    f = data.float()
    assert f.dtype == torch.float32 and f.shape == (5, 3, 32, 32)
    assert torch.equal(f, x.double().div(255).float())
    assert 0.0 <= f.min() and f.max() <= 1.0
    xs, ys = data.to_dataset().tensors
    assert torch.equal(xs, f) and torch.equal(ys, torch.arange(5))
    assert len(data.head(2)) == 2 and len(data) == 5


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), "uint8"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), r"\(N, 3, H, W\)"),
        (
            torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.long),
            r"labels must be .* \(2,\)",
        ),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, -2]), ">= -1"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 5]), "len\\(classes\\)"),
    ],
)
def test_imageset_rejects_bad_tensors(images, labels, match):
    with pytest.raises(ValueError, match=match):
        ImageSet(images, labels, classes=("a", "b"))


# --- decoding and resizing ----------------------------------------------------------------------


def test_resize_of_64x64_equals_pil_bilinear():
    a = _rng_image(np.random.default_rng(1), 64, 64)
    got, gray = images_mod.decode_image(_png(a))
    want = np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR))
    assert not gray
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("h, w", [(48, 64), (64, 40), (32, 50), (20, 20), (31, 33)])
def test_non_square_images_follow_resize_then_center_crop(h, w):
    a = _rng_image(np.random.default_rng(h * w), h, w)
    got, _ = images_mod.decode_image(_png(a))
    assert got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, _pil_reference(a))


def test_32x32_pixels_are_untouched_and_other_sizes_supported():
    a = _rng_image(np.random.default_rng(2), 32, 32)
    got, _ = images_mod.decode_image(_png(a))
    np.testing.assert_array_equal(got, a)
    got16, _ = images_mod.decode_image(_png(a), size=16)
    np.testing.assert_array_equal(got16, np.asarray(Image.fromarray(a).resize((16, 16), Image.BILINEAR)))


def test_grayscale_rgba_cmyk_become_rgb():
    rng = np.random.default_rng(3)
    g = _rng_image(rng, channels=1)
    got, gray = images_mod.decode_image(_png(g))
    assert gray
    np.testing.assert_array_equal(got, np.stack([g, g, g], axis=-1))  # channel replication
    rgba = rng.integers(0, 256, size=(32, 32, 4), dtype=np.uint8)
    got, gray = images_mod.decode_image(_png(rgba))
    assert not gray
    np.testing.assert_array_equal(got, rgba[..., :3])  # alpha dropped, as PIL convert("RGB")
    cmyk = Image.fromarray(_rng_image(rng)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    got, _ = images_mod.decode_image(buf.getvalue())
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        np.testing.assert_array_equal(got, np.asarray(img.convert("RGB")))


def test_undecodable_bytes_raise_decode_error():
    with pytest.raises(images_mod.DecodeError):
        images_mod.decode_image(b"not an image at all")


# --- folders and tars ---------------------------------------------------------------------------


def test_image_folder_png_exact_pixels_labels_sorted_classes(folder):
    root, arrays = folder
    data = load_image_folder(root, progress=False)
    want_x, want_y = _expected(arrays)
    assert data.classes == CLASSES
    assert torch.equal(data.images, want_x)
    assert torch.equal(data.labels, want_y)
    assert data.name == "train" and data.source == str(root)


@pytest.mark.parametrize("mode, suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_image_tar_exact_pixels_in_sorted_order(folder, tmp_path, mode, suffix):
    root, arrays = folder
    path = _tar(root, tmp_path / f"train{suffix}", mode=mode)
    want_x, want_y = _expected(arrays)
    for prefix in ("train", None):  # explicit and inferred
        data = load_image_tar(path, prefix=prefix, progress=False)
        assert data.classes == CLASSES
        assert torch.equal(data.images, want_x)
        assert torch.equal(data.labels, want_y)


def test_image_tar_limit_keeps_full_class_list(folder, tmp_path):
    root, arrays = folder
    path = _tar(root, tmp_path / "train.tar")
    data = load_image_tar(path, limit=5, progress=False)
    want_x, want_y = _expected(arrays)
    assert data.classes == CLASSES  # from the whole archive, not only the 5 members read
    assert torch.equal(data.images, want_x[:5]) and torch.equal(data.labels, want_y[:5])


def test_image_tar_jpeg_matches_pil_decode(tmp_path):
    rng = np.random.default_rng(4)
    blobs = {f"test/{c}/{i}.jpg": _jpeg(_rng_image(rng)) for c in ("b", "a") for i in range(3)}
    path = tmp_path / "test.tar"
    with tarfile.open(path, "w") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    data = load_image_tar(path, progress=False)
    for row, name in enumerate(sorted(blobs)):
        want = np.asarray(Image.open(io.BytesIO(blobs[name])).convert("RGB"))
        assert torch.equal(data.images[row], _chw(want))
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_grayscale_images_are_replicated_and_logged(tmp_path, caplog):
    rng = np.random.default_rng(5)
    (tmp_path / "x" / "a").mkdir(parents=True)
    g = _rng_image(rng, channels=1)
    (tmp_path / "x" / "a" / "0.png").write_bytes(_png(g))
    (tmp_path / "x" / "a" / "1.png").write_bytes(_png(_rng_image(rng)))
    with caplog.at_level(logging.INFO, logger="covguard.data.images"):
        data = load_image_folder(tmp_path / "x", progress=False)
    assert torch.equal(data.images[0], torch.from_numpy(g)[None].expand(3, 32, 32))
    assert "converted 1 of 2 grayscale images to RGB" in caplog.text


def test_mixed_sizes_are_each_resized(tmp_path):
    rng = np.random.default_rng(6)
    sizes = [(32, 32), (64, 64), (48, 80), (28, 28)]
    arrays = [_rng_image(rng, h, w) for h, w in sizes]
    (tmp_path / "m" / "c").mkdir(parents=True)
    for i, a in enumerate(arrays):
        (tmp_path / "m" / "c" / f"{i}.png").write_bytes(_png(a))
    data = load_image_folder(tmp_path / "m", progress=False)
    assert data.images.shape == (4, 3, 32, 32)
    for i, a in enumerate(arrays):
        assert torch.equal(data.images[i], _chw(_pil_reference(a)))


def test_corrupt_jpegs_are_skipped_with_one_counting_warning(tmp_path):
    rng = np.random.default_rng(7)
    good = [_jpeg(_rng_image(rng)) for _ in range(3)]
    blobs = {"s/c/0.jpg": good[0], "s/c/1.jpg": b"\xff\xd8garbage", "s/c/2.jpg": good[1],
             "s/c/3.jpg": good[2][: len(good[2]) // 2], "s/c/4.jpg": good[2]}  # fmt: skip
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_image_tar(path, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "skipped 2 of 5 images" in messages[0] and str(path) in messages[0]
    assert len(data) == 3 and data.skipped == 2
    # a cached set keeps the count and warns again on every later load
    cached(lambda: data, sources=[path], params={"name": "s"}, cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="2 images failed to decode and are missing"):
        again = cached(lambda: data, sources=[path], params={"name": "s"}, cache_dir=tmp_path / "c")
    assert again.skipped == 2 and torch.equal(again.images, data.images)


def test_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "z" / "c").mkdir(parents=True)
    (tmp_path / "z" / "c" / "0.jpg").write_bytes(b"nope")
    with (
        pytest.warns(UserWarning, match="skipped 1 of 1"),
        pytest.raises(ValueError, match="no image could be decoded"),
    ):
        load_image_folder(tmp_path / "z", progress=False)


def test_archive_and_folder_errors_name_the_path(tmp_path, folder):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(ValueError, match="holds no images") as err:
        load_image_tar(empty, progress=False)
    assert str(empty) in str(err.value)
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        load_image_tar(zero, progress=False)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(np.random.default_rng(12).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="junk.tar"):
        load_image_tar(junk, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        load_image_tar(tmp_path / "missing.tar", progress=False)
    root, _ = folder
    path = _tar(root, tmp_path / "t.tar")
    with pytest.raises(ValueError, match="under prefix 'test'"):
        load_image_tar(path, prefix="test", progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path / "nothing", progress=False)
    with pytest.raises(FileNotFoundError, match="root must be an existing folder"):
        load_image_folder(tmp_path / "absent", progress=False)
    with pytest.raises(ValueError, match="are not in the given classes"):
        load_image_folder(root, classes=("airplane", "cat"), progress=False)


def test_tar_with_two_prefixes_needs_prefix(folder, tmp_path):
    root, arrays = folder
    path = tmp_path / "both.tar"
    with tarfile.open(path, "w") as tar:
        for p in sorted(root.rglob("*.png")):
            tar.add(p, arcname=f"train/{p.relative_to(root).as_posix()}")
            tar.add(p, arcname=f"test/{p.relative_to(root).as_posix()}")
    with pytest.raises(ValueError, match="pass prefix="):
        load_image_tar(path, progress=False)
    assert len(load_image_tar(path, prefix="test", progress=False)) == len(arrays)


# --- imglist ------------------------------------------------------------------------------------


def test_imglist_reads_listed_images_in_list_order(folder, tmp_path):
    root, arrays = folder
    keys = ["dog/0001.png", "airplane/0000.png", "cat/0003.png"]
    lst = tmp_path / "test_x.txt"
    lst.write_text(f"{keys[0]} 2\n\n{keys[1]} -1\n{keys[2]} {{'label': 1}}\n")
    assert read_imglist(lst) == [(keys[0], 2), (keys[1], -1), (keys[2], 1)]
    data = load_imglist(lst, root, num_classes=3, progress=False)
    assert data.labels.tolist() == [2, -1, 1]
    assert torch.equal(data.images, torch.stack([_chw(arrays[k]) for k in keys]))
    assert data.name == "test_x" and data.classes == ()
    assert len(load_imglist(lst, root, limit=2, progress=False)) == 2


def test_imglist_errors(folder, tmp_path):
    root, _ = folder
    lst = tmp_path / "l.txt"
    lst.write_text("dog/0001.png 7\n")
    with pytest.raises(ValueError, match=r"l.txt: image 'dog/0001.png' has label 7, an unknown class"):
        load_imglist(lst, root, classes=CLASSES, progress=False)
    lst.write_text("dog/0001.png 0\ndog/9999.png 0\ncat/8888.png -1\n")
    with pytest.raises(FileNotFoundError, match="points at 2 missing files") as err:
        load_imglist(lst, root, progress=False)
    assert "9999.png" in str(err.value) and str(root) in str(err.value)
    lst.write_text("dog/0001.png\n")
    with pytest.raises(ValueError, match=r"l.txt:1: expected 'relative/path label'"):
        read_imglist(lst)
    lst.write_text("dog/0001.png 0\n/etc/passwd 0\n")
    with pytest.raises(ValueError, match=r"l.txt:2: image path must be relative"):
        read_imglist(lst)
    lst.write_text("dog/0001.png cat\n")
    with pytest.raises(ValueError, match="label must be an integer"):
        read_imglist(lst)
    lst.write_text("\n\n")
    with pytest.raises(ValueError, match="lists no images"):
        read_imglist(lst)
    with pytest.raises(FileNotFoundError, match="imglist file not found"):
        read_imglist(tmp_path / "none.txt")


# --- IDX / MNIST --------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [True, False])
def test_idx_mnist_gz_or_plain(tmp_path, compress):
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    y = np.array([7, 2, 1, 0, 4, 9], dtype=np.uint8)
    write = gzip.compress if compress else (lambda b: b)
    (tmp_path / "img").write_bytes(write(_idx_bytes(x)))
    (tmp_path / "lab").write_bytes(write(_idx_bytes(y)))
    np.testing.assert_array_equal(read_idx(tmp_path / "img"), x)
    i32 = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    (tmp_path / "i32").write_bytes(write(_idx_bytes(i32)))
    np.testing.assert_array_equal(read_idx(tmp_path / "i32"), i32)
    data = load_mnist(tmp_path / "img", tmp_path / "lab")
    assert data.images.shape == (6, 3, 32, 32) and data.labels.tolist() == y.tolist()
    for i in range(6):
        assert torch.equal(data.images[i], _chw(_pil_reference(x[i])))  # bilinear 28 -> 32, replicated
    assert data.classes == tuple("0123456789")
    assert load_mnist(tmp_path / "img").labels.tolist() == [-1] * 6
    assert len(load_mnist(tmp_path / "img", tmp_path / "lab", limit=2)) == 2


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x07\x01abcd")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="needs 6 bytes of data; got 5"):
        read_idx(short)
    (tmp_path / "img").write_bytes(_idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    (tmp_path / "lab").write_bytes(_idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(ValueError, match="must hold 3 integers"):
        load_mnist(tmp_path / "img", tmp_path / "lab")


# --- SVHN ---------------------------------------------------------------------------------------


def test_svhn_mat_label_10_is_zero(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [3]], dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    data = load_svhn(tmp_path / "test_32x32.mat")
    assert data.labels.tolist() == [0, 1, 9, 0, 3]
    assert torch.equal(data.images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    savemat(tmp_path / "bad.mat", {"X": x[..., :2]})
    with pytest.raises(ValueError, match="must hold variables 'X' and 'y'"):
        load_svhn(tmp_path / "bad.mat")


# --- Tiny ImageNet ------------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    """tiny-imagenet-200 with 12 val images (64x64 PNG bytes in .JPEG names; #3 grayscale)."""
    rng = np.random.default_rng(10)
    base = tmp_path / "tin" / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    wnids = ["n02", "n01", "n03"]
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    arrays, lines = [], []
    for i in range(12):
        a = _rng_image(rng, 64, 64, channels=1 if i == 3 else 3)
        arrays.append(a)
        (base / "val" / "images" / f"val_{i}.JPEG").write_bytes(_png(a))
        lines.append(f"val_{i}.JPEG\t{wnids[i % 3]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(reversed(lines)) + "\n")
    want_y = [sorted(wnids).index(wnids[i % 3]) for i in range(12)]
    return base, arrays, want_y


def test_tiny_imagenet_folder_and_tar(tiny, tmp_path):
    base, arrays, want_y = tiny
    want_x = torch.stack([_chw(_pil_reference(a)) for a in arrays])  # 64 -> 32, gray replicated
    tar_path = tmp_path / "tin.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(base, arcname="tiny-imagenet-200")
    for path in (base, base.parent, tar_path):
        data = load_tiny_imagenet_val(path, progress=False)
        assert data.classes == ("n01", "n02", "n03")
        assert data.labels.tolist() == want_y  # val_0, val_1, ..., val_11 (natural order)
        assert torch.equal(data.images, want_x)
    assert load_tiny_imagenet_val(tar_path, limit=4, progress=False).labels.tolist() == want_y[:4]


def test_tiny_imagenet_errors(tiny, tmp_path):
    base, _, _ = tiny
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_99.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(FileNotFoundError, match=r"names 1 images missing .*val_99.JPEG"):
        load_tiny_imagenet_val(base, progress=False)
    ann.write_text("val_0.JPEG\tn77\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"wnids missing from wnids.txt: \['n77'\]"):
        load_tiny_imagenet_val(base, progress=False)
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200 folder"):
        load_tiny_imagenet_val(tmp_path / "nowhere", progress=False)


# --- cache --------------------------------------------------------------------------------------


def test_cached_builds_once_and_invalidates_on_change(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"one")
    calls = []

    def build():
        calls.append(1)
        return ImageSet(
            torch.full((2, 3, 4, 4), len(calls), dtype=torch.uint8), torch.tensor([0, -1]), ("a",), "s", "p"
        )

    first = cached(build, sources=[src], params={"name": "s", "size": 4}, cache_dir=tmp_path / "c")
    second = cached(build, sources=[src], params={"name": "s", "size": 4}, cache_dir=tmp_path / "c")
    assert len(calls) == 1
    assert torch.equal(first.images, second.images) and torch.equal(second.labels, torch.tensor([0, -1]))
    assert (second.classes, second.name, second.source) == (("a",), "s", "p")
    cached(build, sources=[src], params={"name": "s", "size": 8}, cache_dir=tmp_path / "c")
    assert len(calls) == 2  # other loader parameters, other entry
    src.write_bytes(b"two!")
    third = cached(build, sources=[src], params={"name": "s", "size": 4}, cache_dir=tmp_path / "c")
    assert len(calls) == 3 and int(third.images[0, 0, 0, 0]) == 3


def test_load_set_decodes_once_then_reads_cache(folder, tmp_path, monkeypatch):
    root, arrays = folder
    data_dir = tmp_path / "data"
    (data_dir / "cifar10-jpeg").mkdir(parents=True)
    tar_path = _tar(root, data_dir / "cifar10-jpeg" / "test.tar", arcprefix="test")
    real, calls = images_mod.decode_image, []

    def counting(data, size=32):
        calls.append(1)
        return real(data, size)

    monkeypatch.setattr(images_mod, "decode_image", counting)
    cache_dir = tmp_path / "cache"
    first = load_set("cifar10_test", data_dir, cache_dir=cache_dir, progress=False)
    assert len(calls) == len(arrays) == len(first)
    assert first.classes[:3] == ("airplane", "automobile", "bird") and len(first.classes) == 10
    assert sorted(set(first.labels.tolist())) == [0, 3, 5]  # airplane, cat, dog in CIFAR-10 order
    second = load_set("cifar10_test", data_dir, cache_dir=cache_dir, progress=False)
    assert len(calls) == len(arrays)  # not decoded again
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes and second.name == "cifar10_test"
    _tar(root, tar_path, arcprefix="test", reverse=False)  # rewritten: new size/mtime
    os.utime(tar_path, ns=(1, 1))
    third = load_set("cifar10_test", data_dir, cache_dir=cache_dir, progress=False)
    assert len(calls) == 2 * len(arrays)
    assert torch.equal(third.images, first.images)
    load_set("cifar10_test", data_dir, cache=False, progress=False)
    assert len(calls) == 3 * len(arrays)


def test_unreadable_cache_entry_is_rebuilt_with_warning(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")

    def build():
        return ImageSet(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))

    cached(build, sources=[src], params={"name": "s"}, cache_dir=tmp_path / "c")
    (entry,) = (tmp_path / "c").iterdir()
    entry.write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        cached(build, sources=[src], params={"name": "s"}, cache_dir=tmp_path / "c")


# --- registry -----------------------------------------------------------------------------------


def test_load_set_errors_list_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'tin' .* expected '.*tiny-imagenet-200-val.tar' or"):
        load_set("tin", tmp_path, cache_dir=tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"t10k-images-idx3-ubyte.gz' \+ '.*t10k-labels-idx1-ubyte.gz'"
    ):
        load_set("mnist", tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="name must be one of"):
        load_set("imagenet", tmp_path)
    with pytest.raises(ValueError, match="limit must be"):
        load_set("tin", tmp_path, limit=0)


def test_load_set_svhn_and_mnist_layouts(tmp_path):
    from scipy.io import savemat

    x = np.random.default_rng(11).integers(0, 256, size=(32, 32, 3, 4), dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [2], [3], [4]])})
    data = load_set("svhn", tmp_path, cache_dir=tmp_path / "c", limit=3)
    assert data.labels.tolist() == [0, 2, 3] and data.name == "svhn"
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([3, 5], np.uint8)))
    assert load_set("mnist", tmp_path, cache=False).labels.tolist() == [3, 5]


def test_data_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("COVGUARD_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.setenv("COVGUARD_DATA", str(tmp_path / "absent"))
    with pytest.warns(UserWarning, match="not a folder"):
        assert data_root() is None


# --- JPEG matching ------------------------------------------------------------------------------


def test_jpeg_matched_equals_pil_q75_420_round_trip():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    got = jpeg_matched(x)
    assert got.shape == x.shape and got.dtype == torch.uint8
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=75, subsampling="4:2:0")
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert torch.equal(got[i], _chw(want))
    assert not torch.equal(got, x)  # noise does not survive JPEG unchanged
    with pytest.raises(ValueError, match="uint8 tensor of shape"):
        jpeg_matched(x.float())
    with pytest.raises(ValueError, match="quality must be"):
        jpeg_matched(x, quality=0)
