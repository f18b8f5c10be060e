"""The shortcut benchmark on the embedded digits, reduced, through its command-line wiring."""

import json

import pytest

from covguard.bench.shortcut import ShortcutConfig, run_shortcut
from covguard.bench.shortcut_report import render_markdown
from covguard.cli import main
from covguard.html_report import referenced_files

REDUCED = ["--epochs", "15", "--max-test", "240", "--baselines", "msp", "energy", "mds", "knn", "--n-heatmaps", "2", "--no-progress"]


def _run(argv):
    return main(["bench", "shortcut", *argv])


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shortcut")
    code = _run(["--dataset", "digits", "--out", str(out), *REDUCED])
    return code, out, json.loads((out / "results.json").read_text())


def test_report_folder(shortcut_run):
    code, out, result = shortcut_run
    assert code == 0
    assert set(result["metrics"]) == {"removed", "moved"}
    detectors = {"simple_mahalanobis", "class_mahalanobis_top1", "class_mahalanobis_mixture", "msp", "energy", "mds", "knn"}
    assert set(result["metrics"]["moved"]) == detectors
    for kind, names in result["figures"].items():
        for name in names:
            assert (out / name).stat().st_size > 0, (kind, name)
    assert len(result["figures"]["heatmaps"]) == 2 and "roc_moved.png" in result["figures"]["roc"]
    assert result["config"]["marker_size"] == [3, 8] and result["config"]["layers"] == ["block1", "block2", "block3"]
    table = (out / "results.md").read_text()
    assert table == render_markdown(result)  # the markdown is a function of results.json
    assert "| class_mahalanobis_top1 |" in table and "## Localization" in table


def test_every_figure_the_page_references_exists(shortcut_run):
    _, out, result = shortcut_run
    refs = referenced_files(out / "report.html")
    assert refs, "the page references no file"
    missing = [r for r in refs if not (out / r).is_file()]
    assert not missing, missing
    shown = {name for names in result["figures"].values() for name in names}
    assert shown <= set(refs) and "results.json" in refs


def test_the_model_learned_the_shortcut(shortcut_run):
    _, _, result = shortcut_run
    acc, to_short = result["accuracy"], result["to_shortcut"]
    assert acc["clean"] > 0.9 and acc["moved_reference"] > 0.9
    assert acc["moved"] < acc["moved_reference"] - 0.15  # the moved marker drags predictions...
    assert to_short["moved"] > 0.15 and to_short["moved_reference"] < 0.05  # ...to the shortcut classes
    assert result["n_fooled"]["moved"] >= 10
    assert sum(result["n_images"][k] for k in ("removed", "moved")) == result["n_images"]["clean"] == 240


def test_patch_detectors_flag_and_localize_the_moved_marker(shortcut_run):
    _, _, result = shortcut_run
    moved = result["metrics"]["moved"]
    for det in ("class_mahalanobis_top1", "class_mahalanobis_mixture"):
        assert moved[det]["auroc"] > 0.9, (det, moved[det])
        assert moved[det]["auroc_fooled"] > 0.85, (det, moved[det])
    for det, per_layer in result["localization"].items():
        row = per_layer["block1"]  # the finest map: the marker's own patches
        assert row["hit_rate_fooled"] > row["chance_fooled"] + 0.4, (det, row)
        assert 0 < row["chance"] < 0.5


def test_bad_input_names_the_argument(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"classes \['11'\] are unknown"):
        run_shortcut(tmp_path / "a", ShortcutConfig(classes=("1", "11")))
    with pytest.raises(ValueError, match="marker must fit the images: marker is 3x20 pixels, images are 16x16"):
        run_shortcut(tmp_path / "b", ShortcutConfig(marker_size=(3, 20)))
    with pytest.raises(ValueError, match="dataset must be one of"):
        run_shortcut(tmp_path / "c", ShortcutConfig(dataset="mnist"))
    code = _run(["--out", str(tmp_path / "d"), "--classes", "zebra", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "classes ['zebra'] are unknown" in err
    with pytest.raises(SystemExit):
        _run(["--marker", "big"])
    assert "--marker must be HEIGHTxWIDTH" in capsys.readouterr().err
