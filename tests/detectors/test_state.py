"""The tensor-state protocol of the baselines: spec letters bind sizes, and refusals name the tensor."""

import pytest
import torch

from covguard.detectors.state import check_state

SPEC = {"a": (torch.float64, ("C", "r")), "b": (torch.float64, (1, "r")), "c": (torch.int64, ("C",))}


def tensors(C=4, r=2):
    return {"a": torch.zeros(C, r, dtype=torch.float64), "b": torch.zeros(1, r, dtype=torch.float64), "c": torch.arange(C)}


def test_letters_bind_sizes_across_tensors():
    assert check_state(SPEC, tensors()) == {"C": 4, "r": 2}
    assert check_state(SPEC, tensors(), channels=4) == {"C": 4, "r": 2}


@pytest.mark.parametrize(
    ("change", "channels", "match"),
    [
        ({"b": torch.zeros(1, 3, dtype=torch.float64)}, None, r"tensor 'b' has shape \(1, 3\); expected \(1, r\) with r=2 from tensor 'a'"),
        ({"b": torch.zeros(2, 2, dtype=torch.float64)}, None, r"tensor 'b' has shape \(2, 2\); expected \(1, r\)$"),
        ({}, 5, r"tensor 'a' has shape \(4, 2\); expected \(C, r\) with C=5 from the model's channel count"),
        ({"c": torch.zeros(4)}, None, "tensor 'c' must be torch.int64; got torch.float32"),
        ({"a": torch.zeros(4, dtype=torch.float64)}, None, r"tensor 'a' has shape \(4,\); expected \(C, r\)"),
        ({"a": torch.full((4, 2), float("nan"), dtype=torch.float64)}, None, "tensor 'a' holds NaN or inf"),
        ({"a": torch.zeros(4, 0, dtype=torch.float64), "b": torch.zeros(1, 0, dtype=torch.float64)}, None, r"tensor 'a' has shape \(4, 0\)"),
        ({"d": torch.zeros(1)}, None, r"state tensors missing \[\], unexpected \['d'\]"),
    ],
)
def test_refusals_name_the_tensor_and_the_expected_shape(change, channels, match):
    with pytest.raises(ValueError, match=match):
        check_state(SPEC, {**tensors(), **change}, channels=channels)
