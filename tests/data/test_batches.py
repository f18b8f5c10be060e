"""ImageBatches: uint8 or float images in [0, 1] batches, re-iterable, labels aligned."""

import pytest
import torch

from covguard.data.batches import ImageBatches, to_unit_float


def test_uint8_and_float_images_give_the_same_batches():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 4, 4), generator=gen, dtype=torch.uint8)
    labels = torch.arange(10)
    as_uint8 = ImageBatches(images, labels, 4)
    as_float = ImageBatches(images.float() / 255, labels, 4)
    assert len(as_uint8) == 3
    for (xa, ya), (xb, yb) in zip(as_uint8, as_float, strict=True):
        assert xa.dtype == torch.float32 and torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb)
    assert torch.equal(torch.cat([x for x, _ in as_uint8]), to_unit_float(images))  # re-iterable, in order
    assert to_unit_float(images).max() <= 1.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="labels must have shape"):
        ImageBatches(torch.zeros(3, 1, 2, 2), torch.zeros(2), 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ImageBatches(torch.zeros(3, 1, 2, 2), torch.zeros(3), 0)
