import json
import subprocess
import sys
from dataclasses import dataclass

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import torch

from covguard.metrics import DetectionMetrics, evaluate
from covguard.report import is_ours, markdown_table, plot_histograms, plot_roc, roc_figure, write_json


def _read_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    return image


# --- markdown_table -------------------------------------------------------------------------------


def test_markdown_table_exact():
    rows = [
        {"method": "mahalanobis", "auroc": 0.98765, "fpr": np.float32(0.125), "n": 100, "extra": "ignored"},
        {"method": "a|b", "auroc": 1.0, "fpr": None, "n": np.int64(7)},
    ]
    expected = (
        "| method | auroc | fpr | n |\n"
        "| --- | --- | --- | --- |\n"
        "| mahalanobis | 0.988 | 0.125 | 100 |\n"
        "| a\\|b | 1.000 | - | 7 |"
    )
    assert markdown_table(rows, ["method", "auroc", "fpr", "n"]) == expected
    assert markdown_table(rows[:1], ["auroc"], floatfmt=".1%") == "| auroc |\n| --- |\n| 98.8% |"


def test_markdown_table_no_rows():
    assert markdown_table([], ["a", "b"]) == "| a | b |\n| --- | --- |"


def test_markdown_table_errors():
    with pytest.raises(ValueError, match=r"rows\[1\] must have every column .* missing \['auroc'\]"):
        markdown_table([{"auroc": 0.5}, {"fpr": 0.1}], ["auroc"])
    with pytest.raises(ValueError, match="columns must name at least one column"):
        markdown_table([{"auroc": 0.5}], [])


# --- plots ----------------------------------------------------------------------------------------


def test_plot_roc_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    clean = rng.normal(size=200)
    curves = {
        "gaussian shift": (clean, rng.normal(1.0, size=150)),
        "with +inf (torch)": (torch.tensor(clean), torch.tensor(np.r_[rng.normal(2.0, size=50), np.inf])),
    }
    path = tmp_path / "nested" / "dir" / "roc.png"
    assert plot_roc(curves, path, title="ROC") == path
    assert path.stat().st_size > 0
    _read_png(path)


def test_plot_roc_errors(tmp_path):
    with pytest.raises(ValueError, match="curves must map at least one label"):
        plot_roc({}, tmp_path / "roc.png")
    with pytest.raises(ValueError, match="scores_out"):
        plot_roc({"bad": ([0.0, 1.0], [np.nan])}, tmp_path / "roc.png")
    assert not (tmp_path / "roc.png").exists()


#: The 14 detectors of the adversarial and OOD benchmarks, in their result order.
BENCH_DETECTORS = [
    "simple_mahalanobis", "class_mahalanobis_top1", "class_penultimate_original", "msp", "max_logit", "energy", "odin",
    "gen", "mds", "rmds", "knn", "vim", "react", "class_mahalanobis_mixture",
]


def test_roc_figure_gives_every_detector_its_own_colour_ours_solid_and_first():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=100)
    curves = {name: (clean, rng.normal(0.1 * i, size=80)) for i, name in enumerate(BENCH_DETECTORS)}
    fig = roc_figure(curves, title="ROC")
    ax = fig.axes[0]
    lines = {line.get_label().split(" (AUROC")[0]: line for line in ax.get_lines()}
    assert set(lines) == {*BENCH_DETECTORS, "chance"}
    colours = [matplotlib.colors.to_hex(lines[name].get_color()) for name in BENCH_DETECTORS]
    assert len(set(colours)) == len(BENCH_DETECTORS), colours
    ours = [name for name in BENCH_DETECTORS if is_ours(name)]
    assert ours == ["simple_mahalanobis", "class_mahalanobis_top1", "class_penultimate_original", "class_mahalanobis_mixture"]
    for name in BENCH_DETECTORS:
        solid = lines[name].get_linestyle() == "-"
        assert solid == (name in ours), (name, lines[name].get_linestyle())
    assert min(lines[n].get_linewidth() for n in ours) > max(lines[n].get_linewidth() for n in BENCH_DETECTORS if n not in ours)
    legend = [text.get_text().split(" (AUROC")[0] for text in ax.get_legend().get_texts()]
    assert legend[: len(ours)] == ours  # ours first, in the given order
    fig.canvas.draw()
    legend_box, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend_box.x0 >= axes_box.x1  # outside the axes: it covers no curve


def test_plot_histograms_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "hist" / "scores.png"
    out = plot_histograms(
        rng.normal(size=500), np.r_[rng.normal(2.0, size=300), np.inf, np.inf], path, title="scores", bins=30
    )
    assert out == path
    assert path.stat().st_size > 0
    _read_png(path)


def test_plot_histograms_all_inf_side(tmp_path):
    path = plot_histograms([0.0, 1.0, 1.5], [np.inf, np.inf], tmp_path / "h.png")
    _read_png(path)


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_plot_histograms_bins_error(tmp_path, bins):
    with pytest.raises(ValueError, match="bins must be an integer >= 1"):
        plot_histograms([0.0], [1.0], tmp_path / "h.png", bins=bins)


def test_import_leaves_pyplot_alone():
    code = "import sys, covguard.report; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- write_json -----------------------------------------------------------------------------------


def test_write_json_round_trips_dataclass(tmp_path):
    metrics = evaluate([0.0, 1.0, 2.0, 3.0], [2.5, 4.0])
    path = write_json(metrics, tmp_path / "a" / "b" / "metrics.json")
    assert path == tmp_path / "a" / "b" / "metrics.json"
    loaded = json.loads(path.read_text())
    assert DetectionMetrics(**loaded) == metrics
    assert list(loaded) == sorted(loaded)
    assert path.read_text().startswith('{\n  "aupr_in": ')


def test_write_json_nested_numpy_and_plain_dataclass(tmp_path):
    @dataclass
    class Run:
        name: str
        auroc: np.float32

    obj = {
        "z": np.int64(3),
        "a": [Run("m", np.float32(0.5)), np.array([1.0, 2.0])],
        "flag": np.bool_(True),
        "path": tmp_path / "x",
    }
    loaded = json.loads(write_json(obj, tmp_path / "o.json").read_text())
    assert loaded == {"a": [{"auroc": 0.5, "name": "m"}, [1.0, 2.0]], "flag": True, "path": str(tmp_path / "x"), "z": 3}


def test_write_json_rejects_unknown_types(tmp_path):
    with pytest.raises(TypeError, match="write_json cannot serialise objects of type set"):
        write_json({"a": {1, 2}}, tmp_path / "o.json")
