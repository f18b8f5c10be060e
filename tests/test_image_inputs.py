"""Hostile image files and archives (issue 14, causes 3-6, 9, 10): every bad image is one DecodeError,
pixels are scaled by their mode's range and turned upright, archives are read in one pass."""

import io
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from covguard.data import images as loader_images
from covguard.decode import DecodeError
from covguard.imagefiles import UnreadableImage, decode_image, iter_images

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def encode(img, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def grey(data, size=(2, 2)):
    return decode_image(data, channels=1, size=size)


# ---- cause 9: high bit depth scaled by the mode's range --------------------------------------------


@pytest.mark.parametrize(
    ("img", "fmt", "expected"),
    [
        (Image.new("1", (2, 2), 1), "PNG", 1.0),
        (Image.new("L", (2, 2), 128), "PNG", 128 / 255),
        (Image.fromarray(np.full((2, 2), 32768, np.uint16)), "PNG", 32768 / 65535),  # I;16
        (Image.fromarray(np.full((2, 2), 40000, np.int32)), "TIFF", 40000 / 65535),  # I
        (Image.fromarray(np.full((2, 2), 0.25, np.float32)), "TIFF", 0.25),  # F
        (Image.new("P", (2, 2), 0), "PNG", 76 / 255),  # palette entry 0 set to red below; L = luma
        (Image.new("RGBA", (2, 2), (200, 200, 200, 0)), "PNG", 200 / 255),  # alpha dropped
        (Image.new("CMYK", (2, 2), (0, 0, 0, 0)), "TIFF", 1.0),  # no ink: white
        (Image.new("LA", (2, 2), (100, 50)), "PNG", 100 / 255),
    ],
    ids=["1", "L", "I;16", "I", "F", "P", "RGBA", "CMYK", "LA"],
)
def test_each_mode_is_scaled_by_its_range(img, fmt, expected):
    if img.mode == "P":
        img.putpalette([255, 0, 0] + [0] * 765)
    data = encode(img, fmt)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == img.mode  # the file really has that mode
    x = grey(data)
    torch.testing.assert_close(x, torch.full_like(x, expected), atol=1e-6, rtol=0)
    rgb = decode_image(data, channels=3, size=(2, 2))
    assert rgb.shape == (3, 2, 2) and 0 <= float(rgb.min()) <= float(rgb.max()) <= 1
    loaded, _ = loader_images.decode_image(data, size=2)  # the data set loaders scale alike
    assert abs(int(loaded[..., 0].mean()) - round(expected * 255)) <= 1 or img.mode in ("P",)


@pytest.mark.parametrize(
    ("array", "match"),
    [(np.full((2, 2), 70000, np.int32), "spans 70000..70000"), (np.full((2, 2), 2.0, np.float32), r"in \[0, 1\]")],
)
def test_modes_that_cannot_be_scaled_are_refused(array, match):
    with pytest.raises(DecodeError, match=match):
        grey(encode(Image.fromarray(array), "TIFF"))


# ---- cause 10: EXIF orientation ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_6_is_decoded_upright(fmt):
    stored = np.zeros((16, 32), np.uint8)  # (H, W): bright left half as stored
    stored[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer rotates 90 degrees clockwise
    data = encode(Image.fromarray(stored), fmt, exif=exif)
    upright = np.rot90(stored, k=-1)  # (32, 16): bright top half
    x = decode_image(data, channels=1, size=(32, 16))[0].numpy() * 255
    assert np.abs(x - upright).mean() < 3
    pixels, _ = loader_images.decode_image(data, size=16)  # loaders: upright, then resized / cropped
    assert pixels[:4, :, 0].mean() > 200 and pixels[-4:, :, 0].mean() < 50


# ---- causes 3-4: every bad image is one DecodeError, the run goes on -----------------------------


@pytest.mark.parametrize("error", [TypeError, NotImplementedError, struct.error, RuntimeError, OSError, SyntaxError])
def test_any_pil_failure_is_a_decode_error(monkeypatch, error):
    def broken(self):
        raise error("plugin failure")

    data = encode(Image.new("L", (2, 2)))
    monkeypatch.setattr(Image.Image, "load", broken)
    with pytest.raises(DecodeError, match=f"{error.__name__}: plugin failure"):
        grey(data)


def test_unidentified_image_message_has_no_object_address():
    with pytest.raises(DecodeError, match=r"not a format PIL identifies \(12 bytes\)") as info:
        grey(b"not an image")
    assert "BytesIO" not in str(info.value) and "0x" not in str(info.value)


def test_decoded_pixels_are_capped_before_decoding():
    png = bytearray(encode(Image.new("L", (1, 1))))
    png[16:24] = struct.pack(">II", 13000, 13000)  # IHDR width, height: a 169-megapixel claim
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    with pytest.raises(DecodeError, match="13000 x 13000 = 169000000 pixels, more than the limit of 50000000"):
        grey(bytes(png))
    with pytest.raises(DecodeError, match="more than the limit of 100"):
        decode_image(encode(Image.new("L", (20, 20))), channels=1, size=(2, 2), max_pixels=100)


def test_huge_files_are_refused_by_size_without_reading(tmp_path):
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:
        handle.truncate(2 * 1024**3)  # sparse: nothing to read if the size check comes first
    total, items = iter_images(tmp_path)
    ((name, data),) = list(items)
    assert total == 1 and name == "huge.png" and isinstance(data, UnreadableImage)
    with pytest.raises(DecodeError, match=r"is 2147483648 bytes \(2.0 GiB\), larger than the limit of 268435456 bytes"):
        grey(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's own notes on corrupt TIFF tags
@FUZZ
@given(
    seed=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_fuzzed_image_bytes_decode_or_raise_decode_error(seed, edits, cut):
    rng = np.random.default_rng(0)
    data = bytearray(encode(Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)), seed))
    for at, value in edits:
        data[at % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    for channels in (1, 3):
        try:
            x = decode_image(data, channels=channels, size=(6, 5))
        except DecodeError:
            continue
        assert x.shape == (channels, 6, 5) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    try:
        pixels, _ = loader_images.decode_image(data, size=4)
    except DecodeError:
        return
    assert pixels.shape == (4, 4, 3) and pixels.dtype == np.uint8


# ---- causes 5-6: archives ------------------------------------------------------------------------


def make_tar(path, names, mode="w"):
    with tarfile.open(path, mode) as archive:
        for i, name in enumerate(names):
            data = encode(Image.new("L", (4, 4), 10 * i))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_truncated_archives_are_a_clear_error(tmp_path, suffix):
    whole = make_tar(tmp_path / f"a{suffix}", ["a.png", "b.png", "c.png"], "w:gz" if suffix == ".tar.gz" else "w")
    raw = whole.read_bytes()  # members of 1024 bytes: a 512-byte header and a tiny PNG padded to 512
    for keep in [len(raw) // 2] if suffix == ".tar.gz" else [512 + 30, 1024 + 100, 2048 + 512 + 30]:
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(raw[:keep])
        with pytest.raises(ValueError, match="truncated"):
            total, items = iter_images(cut)
            list(items)


def test_links_in_archives_are_skipped_with_one_warning(tmp_path):
    path = make_tar(tmp_path / "links.tar", ["a.png"])
    with tarfile.open(path, "a") as archive:
        for name, kind in (("s.png", tarfile.SYMTYPE), ("h.png", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.png"
            archive.addfile(info)
    with pytest.warns(UserWarning, match="skipped 2 archive members that are links or special files") as record:
        total, items = iter_images(path)
    assert total == 1 and [name for name, _ in items] == ["a.png"] and len(record) == 1


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_archives_are_read_in_one_forward_pass(tmp_path, monkeypatch, mode):
    names = [f"img{i:03d}.png" for i in range(40)][::-1]  # stored in reverse name order
    path = make_tar(tmp_path / f"r.tar.{mode[2:]}", names, mode)
    offsets, real = [], tarfile.TarFile.extractfile

    def recording(self, member):
        offsets.append(member.offset)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", recording)
    total, items = iter_images(path, order="archive")
    assert [name for name, _ in items] == names and offsets == sorted(offsets)  # storage order, forward only
    offsets.clear()
    total, items = iter_images(path)  # sorted order, still one forward pass
    assert [name for name, _ in items] == sorted(names) and offsets == sorted(offsets) and len(offsets) == 40


def test_non_utf8_names_are_escaped(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as handle:
        handle.write(encode(Image.new("L", (4, 4))))
    total, items = iter_images(folder)
    ((name, data),) = list(items)
    assert name == "caf\\xe9.png" and name.encode("utf-8") and grey(data).shape == (1, 2, 2)
