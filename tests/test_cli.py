"""The command-line parsers: every command's options and where they dispatch (runs are tested per command)."""

import pytest

from covguard import cli, commands
from covguard.covariance import COVARIANCE_FORMS


def test_bench_timing_options_reach_its_handler():
    args = cli.build_parser().parse_args(["bench", "timing", "--quick", "--no-memory", "--models", "resnet20", "--out", "x"])
    assert args.func is commands.bench_timing and args.quick and args.no_memory and args.models == ["resnet20"]


@pytest.mark.parametrize("command", [["demo"], ["bench", "adversarial"], ["bench", "ood"], ["bench", "shortcut"]])
def test_covariance_choices_are_the_library_forms(command, capsys):
    parser = cli.build_parser()
    for form in COVARIANCE_FORMS:
        assert parser.parse_args([*command, "--covariance", form]).covariance == form
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--covariance", "spherical"])
    assert "invalid choice: 'spherical'" in capsys.readouterr().err


def test_shortcut_marker_and_output_folder(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "shortcut", "--dataset", "cifar10", "--marker", "4x12"])
    assert args.marker == (4, 12) and args.out.replace("<dataset>", args.dataset) == "results/shortcut-cifar10"
    assert args.batch_size == 128 and args.func is commands.bench_shortcut
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "shortcut", "--marker", "big"])
    assert "--marker must be HEIGHTxWIDTH" in capsys.readouterr().err


def test_heatmap_dispatches_to_its_handler():
    args = cli.build_parser().parse_args(["heatmap", "--detector", "d", "--model", "m", "--weights", "w", "--images", "i"])
    assert args.func is commands.heatmap and args.out == "heatmaps" and args.max_images == 32
