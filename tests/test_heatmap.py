"""Per-patch heatmaps: patch geometry against a naive reference, localization, figures, the CLI."""

import numpy as np
import pytest
import torch
from conftest import make_images
from matplotlib.figure import Figure
from PIL import Image
from safetensors.torch import save_file

import covguard as cg
from covguard.detectors.msp import MSP
from covguard.heatmap import (
    PatchGeometry,
    heatmap_figures,
    patch_footprints,
    patch_geometry,
    save_heatmaps,
    score_maps,
    top_patch_hits,
)
from covguard.cli import main
from covguard.html_report import referenced_files
from covguard.models import MODELS


def naive_footprint(i, j, k, p, stride, input_size):
    """Input pixels covered by patch (i, j): every pixel whose feature cell is inside the patch."""
    rows = [r for r in range(input_size[0]) if i - p <= int(r // stride[0]) <= i - p + k - 1]
    cols = [c for c in range(input_size[1]) if j - p <= int(c // stride[1]) <= j - p + k - 1]
    return rows, cols


@pytest.mark.parametrize(
    "map_size, input_size, k, p",
    [((6, 6), (8, 8), 3, 0), ((2, 2), (16, 16), 3, 0), ((8, 8), (16, 16), 3, 1), ((1, 1), (32, 32), 1, 0), ((5, 3), (14, 10), 3, 0)],
)
def test_patch_footprints_match_a_naive_reference(map_size, input_size, k, p):
    hf, wf = map_size[0] + k - 1 - 2 * p, map_size[1] + k - 1 - 2 * p
    geometry = PatchGeometry(map_size, input_size, k, p, (input_size[0] / hf, input_size[1] / wf))
    foot = patch_footprints(geometry)
    assert foot.shape == (*map_size, 4)
    for i in range(map_size[0]):
        for j in range(map_size[1]):
            rows, cols = naive_footprint(i, j, k, p, geometry.stride, input_size)
            assert foot[i, j].tolist() == [rows[0], cols[0], len(rows), len(cols)], (i, j)


def test_extent_puts_each_value_over_its_patch_centre_cell():
    # stride 2, 3x3 valid patches on an 8x8 map of a 16x16 image: patch 0 is centred on cell 1 = pixels 2..3
    geometry = PatchGeometry((6, 6), (16, 16), 3, 0, (2.0, 2.0))
    assert geometry.extent() == (1.5, 13.5, 13.5, 1.5)
    padded = PatchGeometry((8, 8), (16, 16), 3, 1, (2.0, 2.0))  # padding 1: patch 0 centred on cell 0
    assert padded.extent() == (-0.5, 15.5, 15.5, -0.5)


def test_top_patch_hits_and_chance():
    geometry = PatchGeometry((6, 6), (8, 8), 3, 0, (1.0, 1.0))
    maps = torch.zeros(3, 6, 6)
    maps[0, 0, 0] = 5.0  # footprint rows 0..2, cols 0..2
    maps[1, 5, 5] = 5.0  # footprint rows 5..7, cols 5..7
    maps[2, 2, 3] = 5.0  # footprint rows 2..4, cols 3..5
    boxes = torch.tensor([[1, 1, 1, 1], [0, 0, 2, 2], [4, 5, 1, 3]])
    hits, chance = top_patch_hits(maps, boxes, geometry)
    assert hits.tolist() == [True, False, True]
    foot = patch_footprints(geometry).reshape(-1, 4).tolist()
    for n, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = np.mean([
            (ft < top + h and top < ft + fh and fl < left + w and left < fl + fw) for ft, fl, fh, fw in foot
        ])
        assert chance[n].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="boxes"):
        top_patch_hits(maps, boxes[:2], geometry)


@pytest.fixture(scope="module")
def detector(tiny_model):
    x, y = make_images(200, seed=3)
    return cg.ClassMahalanobis(tiny_model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit([(x[:100], y[:100]), (x[100:], y[100:])], progress=False)


def test_a_bright_square_is_found_by_the_top_patch(detector):
    x, _ = make_images(40, seed=4)
    boxes = torch.tensor([[r, c, 2, 2] for r, c in zip([0, 5, 2, 6] * 10, [6, 1, 3, 6] * 10)])
    for n, (r, c, h, w) in enumerate(boxes.tolist()):
        x[n, :, r : r + h, c : c + w] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # a checker the fit never saw
    maps = score_maps(detector, x, layers=["block1"], batch_size=16)
    geometry = patch_geometry(detector, "block1", maps["block1"].shape[1:], x.shape[-2:])
    hits, chance = top_patch_hits(maps["block1"], boxes, geometry)
    assert hits.float().mean() > chance.mean() + 0.3


def test_figures_one_per_image_with_a_shared_scale_per_layer(detector):
    x, _ = make_images(3, seed=5)
    maps = score_maps(detector, x)
    boxes = torch.tensor([[0, 0, 2, 3], [-1, -1, 0, 0], [4, 4, 2, 2]])
    figs = heatmap_figures(detector, x, maps=maps, boxes=boxes, titles=["a", "b", "c"])
    assert len(figs) == 3 and all(isinstance(f, Figure) for f in figs)
    for layer in detector.layers:
        lo, hi = maps[layer].min().item(), maps[layer].max().item()
        for fig in figs:
            (panel,) = [ax for ax in fig.axes if ax.get_label() == layer]
            overlay = panel.get_images()[-1]
            assert overlay.get_clim() == pytest.approx((lo, hi))
            np.testing.assert_allclose(overlay.get_array(), maps[layer][figs.index(fig)].numpy(), rtol=1e-6)
    assert figs[0].axes[0].get_label() == "input"
    assert len(figs[0].axes[0].patches) == 1 and len(figs[1].axes[0].patches) == 0  # the box is outlined
    only = heatmap_figures(detector, x[:1], layers=["block2"])
    assert len(only[0].axes) == 3  # input, block2, its colour bar


def test_heatmaps_are_saved(detector, tmp_path):
    x, _ = make_images(2, seed=6)
    paths = save_heatmaps(detector, x, tmp_path / "maps", names=["one.png", "dir/two words.jpg"])
    assert [p.name for p in paths] == ["heatmap_000_one.png", "heatmap_001_two_words.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_layer_not_fitted_is_an_error_naming_the_layers(detector):
    x, _ = make_images(2, seed=7)
    with pytest.raises(ValueError, match=r"layers \['fc'\] were not fitted by the detector; it was fitted on \['block1', 'block2'\]"):
        heatmap_figures(detector, x, layers=["block1", "fc"])
    with pytest.raises(ValueError, match="layers"):
        score_maps(detector, x, layers=["avgpool"])


def test_bad_arguments(detector, tiny_model):
    x, _ = make_images(2, seed=7)
    with pytest.raises(TypeError, match="patch detector"):
        heatmap_figures(MSP(tiny_model), x)
    with pytest.raises(ValueError, match="x must be"):
        heatmap_figures(detector, x[0])
    with pytest.raises(ValueError, match="titles"):
        heatmap_figures(detector, x, titles=["only one"])
    with pytest.raises(ValueError, match="boxes"):
        heatmap_figures(detector, x, boxes=torch.zeros(3, 4))


# ---- covguard heatmap ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("heatmap_cli")
    torch.manual_seed(0)
    model = MODELS["small_cnn"](width=4, num_classes=3).eval()
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(120, 1, 16, 16, generator=gen) * 0.3
    cg.save(cg.SimpleMahalanobis(model, layers=["block1", "block2"], covariance="full", fit_positions=1.0).fit([x], progress=False), root / "det.safetensors")
    folder = root / "images"
    folder.mkdir()
    for i in range(3):
        pixels = (torch.rand(16, 16, generator=gen) * 80).to(torch.uint8).numpy()
        pixels[2:5, 3:9] = 255
        Image.fromarray(pixels, "L").save(folder / f"img {i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def _run(argv):
    return main(["heatmap", *argv])


def test_cli_writes_heatmaps_and_a_report(cli_setup, capsys):
    root = cli_setup
    out = root / "out"
    code = _run([
        "--detector", str(root / "det.safetensors"), "--model", "small_cnn", "--model-arg", "width=4",
        "--model-arg", "num_classes=3", "--weights", str(root / "weights.safetensors"), "--images", str(root / "images"),
        "--out", str(out), "--no-progress",
    ])
    assert code == 0, capsys.readouterr().err
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["heatmap_000_img_0.png", "heatmap_001_img_1.png", "heatmap_002_img_2.png"]
    refs = referenced_files(out / "report.html")
    assert set(pngs) <= set(refs) and all((out / r).is_file() for r in refs)
    html = (out / "report.html").read_text()
    assert "broken.png" in html and "img 0.png" in html


def test_cli_unknown_layer_names_the_argument(cli_setup, capsys):
    root = cli_setup
    code = _run([
        "--detector", str(root / "det.safetensors"), "--model", "small_cnn", "--model-arg", "width=4",
        "--model-arg", "num_classes=3", "--weights", str(root / "weights.safetensors"), "--images", str(root / "images"),
        "--out", str(root / "bad"), "--layers", "block3", "--no-progress",
    ])
    err = capsys.readouterr().err
    assert code == 2 and "layers ['block3']" in err and "['block1', 'block2']" in err
    assert not (root / "bad").exists()
