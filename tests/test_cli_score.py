"""``covguard score``: a calibrated guard file + a registry model + a folder, tar or file of images -> CSV."""

import csv
import os
import re
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import covguard as cg
from covguard.cli import main
from covguard.guard import decode_image, iter_images
from covguard.imagefiles import list_images
from covguard.models import MODELS

MODEL_ARGS = ["--model", "small_cnn", "--model-arg", "width=4", "--model-arg", "num_classes=3"]


def blobs(n, seed, shift=0.0):
    """(n, 1, 16, 16) smooth images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, 16)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    c = torch.rand(n, 2, generator=gen) - 0.5
    blob = torch.exp(-((xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2) / 0.3)
    return (0.8 * blob[:, None] + 0.1 * torch.rand(n, 1, 16, 16, generator=gen) + shift).clamp(0, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = MODELS["small_cnn"](width=4, num_classes=3).eval()
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    det = cg.SimpleMahalanobis(model, layers=["block2", "block3"], covariance="full", fit_positions=1.0).fit([blobs(200, 1)], progress=False)
    guard = cg.Guard(model, det).calibrate([blobs(1000, 2)], tpr=0.9, progress=False)
    guard.save(root / "guard.safetensors")
    cg.save(det, root / "plain.safetensors")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    pictures = {}
    for i, x in enumerate(blobs(5, 3)):
        pixels = (x[0].numpy() * 255).round().astype(np.uint8)
        img = Image.fromarray(pixels, "L").resize((20, 24), Image.BILINEAR)  # another size: resized back
        if i % 2:
            img = img.convert("RGB")  # RGB files are converted to the model's one channel
        name = f"sub/img{i}.png" if i == 4 else f"img{i}.png"
        img.save(folder / name)
        pictures[name] = (folder / name).read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, size=(16, 16), dtype=np.uint8)
    Image.fromarray(noise, "L").save(folder / "noise.png")  # out of distribution
    pictures["noise.png"] = (folder / "noise.png").read_bytes()
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image")
    with tarfile.open(root / "images.tar.gz", "w:gz") as archive:
        for name in sorted(pictures):
            archive.add(folder / name, arcname=f"batch/{name}")
    return root, model, guard, pictures


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_rows(guard, pictures):
    x = torch.stack([decode_image(data, channels=1, size=(16, 16)) for data in pictures.values()])
    out = guard(x)
    return {
        name: (s, f, p)
        for name, s, f, p in zip(pictures, out.scores.tolist(), out.flagged.tolist(), out.predictions.tolist())
    }


def run(setup, images, out, *extra):
    root = setup[0]
    argv = [
        "score",
        "--detector",
        str(root / "guard.safetensors"),
        *MODEL_ARGS,
        "--weights",
        str(root / "weights.safetensors"),
    ]
    return main([*argv, "--images", str(images), "--out", str(out), "--batch-size", "2", *extra])


def test_scores_a_folder(setup, tmp_path, capsys):
    root, _, guard, pictures = setup
    assert run(setup, root / "images", tmp_path / "scores.csv") == 0
    rows = read_csv(tmp_path / "scores.csv")
    assert [r["path"] for r in rows] == [
        "broken.png",
        "img0.png",
        "img1.png",
        "img2.png",
        "img3.png",
        "noise.png",
        "sub/img4.png",
    ]
    assert rows[0]["flagged"] == "True" and rows[0]["score"] == "" and "cannot decode image" in rows[0]["error"]
    expected = expected_rows(guard, pictures)
    for row in rows[1:]:
        score, flagged, predicted = expected[row["path"]]
        assert float(row["score"]) == pytest.approx(score, rel=1e-5, abs=1e-4)
        assert row["flagged"] == str(flagged) and int(row["predicted_class"]) == predicted and row["error"] == ""
    assert [r["path"] for r in rows if r["flagged"] == "True"] == ["broken.png", "noise.png"]
    captured = capsys.readouterr()
    assert "scored 6 images (1 could not be decoded)" in captured.out and "calibrated for TPR 0.90" in captured.out
    assert "score" in captured.err  # the progress bar


def test_scores_a_tar_archive_and_a_single_file(setup, tmp_path):
    root, _, guard, pictures = setup
    assert run(setup, root / "images.tar.gz", tmp_path / "tar.csv", "--no-progress") == 0
    rows = read_csv(tmp_path / "tar.csv")
    assert [r["path"] for r in rows] == [f"batch/{name}" for name in sorted(pictures)]
    assert run(setup, root / "images" / "img1.png", tmp_path / "one.csv", "--no-progress") == 0
    (one,) = read_csv(tmp_path / "one.csv")
    assert float(one["score"]) == pytest.approx(expected_rows(guard, pictures)["img1.png"][0], rel=1e-5, abs=1e-4)
    tar_scores = {r["path"].removeprefix("batch/"): float(r["score"]) for r in rows}
    assert tar_scores["img1.png"] == pytest.approx(float(one["score"]), rel=1e-5, abs=1e-4)


def test_errors_exit_2_with_a_message(setup, tmp_path, capsys):
    root = setup[0]
    argv = [
        "score",
        *MODEL_ARGS,
        "--weights",
        str(root / "weights.safetensors"),
        "--images",
        str(root / "images"),
        "--out",
        str(tmp_path / "s.csv"),
    ]
    assert main([*argv, "--detector", str(root / "plain.safetensors")]) == 2
    assert "holds a detector without a guard calibration" in capsys.readouterr().err
    torch.manual_seed(1)
    save_file(MODELS["small_cnn"](width=4, num_classes=3).state_dict(), str(tmp_path / "other.safetensors"))
    argv[argv.index("--weights") + 1] = str(tmp_path / "other.safetensors")
    assert main([*argv, "--detector", str(root / "guard.safetensors")]) == 2
    assert "model parameters differ" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="model parameters differ"):
        assert main([*argv, "--detector", str(root / "guard.safetensors"), "--no-strict-model", "--no-progress"]) == 0
    assert main(["score", "--detector", "x", "--model", "nope", "--weights", "w", "--images", ".", "--out", "o"]) == 2
    assert "--model must be one of" in capsys.readouterr().err


def test_decode_converts_channels_and_resizes_bilinear():
    buf = io.BytesIO()
    Image.new("RGB", (30, 10), (200, 100, 50)).save(buf, format="PNG")
    grey = decode_image(buf.getvalue(), channels=1, size=(8, 12))
    assert grey.shape == (1, 8, 12) and grey.dtype == torch.float32
    luma = round(200 * 299 / 1000 + 100 * 587 / 1000 + 50 * 114 / 1000)  # ITU-R 601-2, as PIL's "L"
    assert torch.allclose(grey, torch.full_like(grey, luma / 255), atol=1 / 255)
    rgb = decode_image(buf.getvalue(), channels=3, size=(8, 12))
    assert rgb.shape == (3, 8, 12) and torch.allclose(rgb[:, 0, 0], torch.tensor([200, 100, 50]) / 255)
    gradient = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))  # (4, 16): 0, 16, ..., 240
    buf = io.BytesIO()
    Image.fromarray(gradient, "L").save(buf, format="PNG")
    half = decode_image(buf.getvalue(), channels=1, size=(4, 8))[0, 0] * 255
    assert torch.allclose(
        half, torch.tensor(np.asarray(Image.fromarray(gradient).resize((8, 4), Image.BILINEAR))[0]).float()
    )
    with pytest.raises(ValueError, match="channels must be 1 .grey. or 3 .RGB."):
        decode_image(buf.getvalue(), channels=2, size=(4, 4))


def test_iter_images_rejects_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="is neither a folder nor a file"):
        iter_images(tmp_path / "nothing")
    assert iter_images(tmp_path)[0] == 0


def test_threads_flag_sets_torch_threads_and_rejects_zero(monkeypatch):
    import torch

    from covguard import cli

    seen = {}
    monkeypatch.setattr(cli, "build_parser", _parser_recording(seen))
    before = torch.get_num_threads()
    try:
        assert cli.main(["--threads", "1", "noop"]) == 0
        assert seen["threads"] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        cli.main(["--threads", "0", "noop"])


def _parser_recording(seen):
    """The real parser plus a 'noop' command that records torch's thread count when it runs."""
    import torch

    from covguard.cli import build_parser as real

    def build():
        parser = real()
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.add_parser("noop").set_defaults(func=lambda args: seen.update(threads=torch.get_num_threads()) or 0)
        return parser

    return build


# ---- issue 14: --out (cause 7), one error boundary (cause 8), bad images do not stop a run (cause 4) ----


def test_out_that_is_an_input_is_refused_and_left_intact(setup, tmp_path, capsys):
    root = setup[0]
    image = root / "images" / "img0.png"
    before = {p: p.read_bytes() for p in (image, root / "guard.safetensors")}
    for out in (image, root / "guard.safetensors", root / "images" / "new.png"):
        assert run(setup, root / "images", out, "--force") == 2
        assert "--out" in capsys.readouterr().err
    assert run(setup, image, image, "--force") == 2
    assert {p: p.read_bytes() for p in before} == before and not (root / "images" / "new.png").exists()


def test_existing_out_needs_force_and_survives_a_failed_run(setup, tmp_path, capsys, monkeypatch):
    root = setup[0]
    out = tmp_path / "scores.csv"
    out.write_text("previous results\n")
    assert run(setup, root / "images", out) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "previous results\n"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import covguard.guard

    monkeypatch.setattr(covguard.guard.Guard, "__call__", interrupted)
    assert run(setup, root / "images", out, "--force", "--no-progress") == 130
    assert out.read_text() == "previous results\n" and [p.name for p in tmp_path.iterdir()] == ["scores.csv"]
    monkeypatch.undo()
    assert run(setup, root / "images", out, "--force", "--no-progress") == 0 and out.read_text().startswith("path,")


def test_out_folder_readonly_folder_and_under_a_file_are_one_line_errors(setup, tmp_path, capsys):
    root = setup[0]
    (tmp_path / "a_file").write_text("x")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        for out, match in [
            (tmp_path, "is a folder"),
            (tmp_path / "a_file" / "s.csv", "cannot create the folder of --out"),
            (readonly / "s.csv", "Permission denied"),
        ]:
            if match == "Permission denied" and os.access(readonly, os.W_OK):
                continue  # running as root: the folder is writable anyway
            assert run(setup, root / "images", out, "--no-progress") == 2
            err = capsys.readouterr().err
            assert match in err and "Traceback" not in err and err.count("\n") == 1
    finally:
        readonly.chmod(0o700)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"--weights": "text"}, "is not a readable safetensors file"),
        ({"--weights": "truncated"}, "is not a readable torch.save"),
        ({"--weights": "empty"}, "is not a readable safetensors file"),
        ({"--device": "cuda:7"}, "--device 'cuda:7'"),
        ({"--device": "bogus"}, "--device 'bogus' is not a torch device"),
        ({"--device": "meta"}, "--device meta holds no data"),
        ({"--model-arg": "bogus=1"}, r"--model-arg: small_cnn does not accept \['bogus', 'num_classes', 'width'\]"),
    ],
)
def test_bad_options_exit_2_with_one_line(setup, tmp_path, capsys, change, match):
    root = setup[0]
    weights = {
        "text": tmp_path / "w.safetensors",
        "truncated": tmp_path / "w.pt",
        "empty": tmp_path / "e.safetensors",
    }
    weights["text"].write_text("these are not weights\n")
    torch.save(MODELS["small_cnn"](width=4, num_classes=3).state_dict(), weights["truncated"])
    weights["truncated"].write_bytes(weights["truncated"].read_bytes()[:300])
    weights["empty"].write_bytes(b"")
    argv = ["score", "--detector", str(root / "guard.safetensors"), *MODEL_ARGS, "--weights", str(root / "weights.safetensors"),
            "--images", str(root / "images"), "--out", str(tmp_path / "s.csv"), "--no-progress"]  # fmt: skip
    for key, value in change.items():
        if key == "--weights":
            argv[argv.index(key) + 1] = str(weights[value])
        else:
            argv += [key, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and err.startswith("covguard score: error:") and err.count("\n") == 1


def test_bad_images_become_rows_and_names_stay_utf8(setup, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(setup[3]["img0.png"])
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as handle:
        handle.write(setup[3]["img1.png"])
    (folder / "fuzzed.tif").write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 64)
    (folder / "blp.png").write_bytes(b"BLP2" + b"\x00" * 200)
    out = tmp_path / "s.csv"
    assert run(setup, folder, out, "--no-progress") == 0
    rows = {r["path"]: r for r in read_csv(out)}
    assert sorted(rows) == ["blp.png", "caf\\xe9.png", "fuzzed.tif", "good.png"]
    assert rows["good.png"]["score"] and rows["caf\\xe9.png"]["score"]
    for name in ("blp.png", "fuzzed.tif"):
        assert rows[name]["flagged"] == "True" and rows[name]["error"].startswith("cannot decode image")
        assert "BytesIO" not in rows[name]["error"]


def test_guard_warns_on_another_spatial_size(setup):
    _, _, guard, _ = setup
    for shape in [(2, 1, 32, 32), (2, 1, 24, 24), (1, 1, 16, 250)]:
        with pytest.warns(UserWarning, match=rf"x is {shape[2]}x{shape[3]} but the detector was fitted on 16x16"):
            guard(torch.rand(shape))


# ---- issue 15: --workers (decoding processes), rows streamed, same bytes whatever the workers ----


def _unsorted_tar(path, pictures):
    """A tar whose storage order is not sorted by name: 40 images (copies) and 4 corrupt members."""
    goods = [(f"d/{k:02d}_{name}", data) for k, (name, data) in enumerate(list(pictures.items()) * 7)][:40]
    bads = [("d/00_bad.png", b"\x89PNG cut"), ("d/zz.jpg", b"\xff\xd8 not a jpeg"), ("d/10.png", b""), ("a.tif", b"II*\x00")]
    with tarfile.open(path, "w") as archive:
        for name, data in reversed(goods[:20] + bads[:2] + goods[20:] + bads[2:]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return sorted(name for name, _ in goods + bads)


def test_workers_give_the_same_csv_bytes_on_a_folder_and_a_tar(setup, tmp_path, monkeypatch):
    import covguard.sorted_rows

    root, _, guard, pictures = setup
    names = _unsorted_tar(tmp_path / "unsorted.tar", pictures)
    assert not list_images(tmp_path / "unsorted.tar").name_order and list_images(root / "images").name_order
    for images in (root / "images", tmp_path / "unsorted.tar"):
        outs = {}
        for workers in ("0", "2"):
            outs[workers] = tmp_path / f"{images.stem}-{workers}.csv"
            assert run(setup, images, outs[workers], "--workers", workers, "--no-progress") == 0
        assert outs["0"].read_bytes() == outs["2"].read_bytes()
    rows = read_csv(outs["0"])  # the tar: sorted by name, one row per member, failures included
    assert [r["path"] for r in rows] == names
    assert [r["path"] for r in rows if r["error"]] == ["a.tif", "d/00_bad.png", "d/10.png", "d/zz.jpg"]
    expected = expected_rows(guard, pictures)
    for row in rows:
        if not row["error"]:
            score = expected[row["path"].split("_", 1)[1]][0]
            assert float(row["score"]) == pytest.approx(score, rel=1e-5, abs=1e-4)
    monkeypatch.setattr(covguard.sorted_rows, "RUN_ROWS", 3)  # 44 rows: 15 sorted runs merged from disk
    assert run(setup, tmp_path / "unsorted.tar", tmp_path / "merged.csv", "--no-progress") == 0
    assert (tmp_path / "merged.csv").read_bytes() == outs["0"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".tar") == sorted(
        ["merged.csv", "images-0.csv", "images-2.csv", "unsorted-0.csv", "unsorted-2.csv"]
    )  # no temporary file left


def test_bad_workers_value_is_a_one_line_error(setup, tmp_path, capsys):
    root = setup[0]
    assert run(setup, root / "images", tmp_path / "s.csv", "--workers", "-1") == 2
    err = capsys.readouterr().err
    assert err == "covguard score: error: --workers must be >= 0 (0: decode in the main process); got -1\n"
    assert not (tmp_path / "s.csv").exists()
