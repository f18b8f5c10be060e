"""Blank frames (data/synthetic.py): solid colours and near-constant images."""

import pytest
import torch

from covguard.data.synthetic import BLANK_COLOURS, blank_frames


def test_solid_frames_are_the_palette_in_order():
    n = 2 * len(BLANK_COLOURS)
    x = blank_frames(n, size=6, near_constant=0.0)
    assert x.shape == (n, 3, 6, 6) and x.dtype == torch.float32
    want = torch.tensor(list(BLANK_COLOURS.values()))
    for i in range(n):
        # every pixel of image i is colour i mod 11: zero spatial variance, the exact RGB value
        assert torch.equal(x[i], want[i % len(want)][:, None, None].expand(3, 6, 6))


def test_near_constant_frames_have_faint_seeded_noise():
    x = blank_frames(40, size=16, seed=3, near_constant=0.5, noise_std=2 / 255)
    solid, noisy = x[:20], x[20:]
    assert (solid.flatten(2).std(2) == 0).all()  # each channel constant
    # grey frames are not clipped: their noise has the requested spread around the colour
    greys = [i for i in range(20, 40) if 2 <= i % len(BLANK_COLOURS) <= 4]
    spread = torch.stack([x[i] - x[i].mean() for i in greys]).std().item()
    assert spread == pytest.approx(2 / 255, rel=0.1)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, blank_frames(40, size=16, seed=3, near_constant=0.5, noise_std=2 / 255))
    assert not torch.equal(noisy, blank_frames(40, size=16, seed=4, near_constant=0.5, noise_std=2 / 255)[20:])


def test_grey_channel_uses_luma():
    x = blank_frames(11, size=4, channels=1, near_constant=0.0)
    assert x.shape == (11, 1, 4, 4)
    red = list(BLANK_COLOURS).index("red")
    assert x[red].mean().item() == pytest.approx(0.299)


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"n": 0}, "n"), ({"n": 4, "channels": 2}, "channels"), ({"n": 4, "near_constant": 1.5}, "near_constant"),
     ({"n": 4, "noise_std": -0.1}, "noise_std"), ({"n": 4, "size": 0}, "size")],
)
def test_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument} must"):
        blank_frames(**kwargs)
