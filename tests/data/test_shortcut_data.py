"""Shortcut data: the striped marker, seeded marking, the (a)/(b)/(c) test sets, bad input."""

import pytest
import torch

from covguard.data.shortcut import (
    MarkerSpec,
    draw_markers,
    marker_pattern,
    place_markers,
    resolve_classes,
    shortcut_set,
    shortcut_test_sets,
)

NAMES = [str(k) for k in range(5)]


def data(n=400, size=12, channels=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=gen) * 0.5 + 0.25, torch.arange(n) % 5


def test_marker_pattern_is_a_striped_bar():
    bar = marker_pattern(MarkerSpec(height=2, width=6, stripe=1), channels=1)
    assert bar.shape == (1, 2, 6)
    assert bar[0, 0].tolist() == [1, 0, 1, 0, 1, 0] and torch.equal(bar[0, 0], bar[0, 1])
    wide = marker_pattern(MarkerSpec(height=1, width=6, stripe=2, light=(1.0, 1.0, 0.0), dark=(0.0,)), channels=3)
    assert wide[:, 0, 0].tolist() == [1, 1, 0] and wide[:, 0, 2].tolist() == [0, 0, 0]
    assert wide[0, 0].tolist() == [1, 1, 0, 0, 1, 1]
    tall = marker_pattern(MarkerSpec(height=4, width=2), channels=1)  # stripes along the long (vertical) side
    assert tall[0, :, 0].tolist() == [1, 0, 1, 0] and torch.equal(tall[0, :, 0], tall[0, :, 1])


def test_draw_markers_paints_only_the_box():
    x = torch.full((3, 1, 8, 8), 0.5)
    boxes = torch.tensor([[1, 2, 2, 4], [-1, -1, 0, 0], [6, 4, 2, 4]])
    out = draw_markers(x, boxes, MarkerSpec(height=2, width=4))
    assert torch.equal(x, torch.full((3, 1, 8, 8), 0.5))  # input untouched
    assert torch.equal(out[0, 0, 1:3, 2:6], torch.tensor([[1.0, 0, 1, 0]] * 2))
    changed = (out != 0.5).squeeze(1)  # (3, 8, 8)
    assert changed[0].sum() == 8 and changed[1].sum() == 0 and changed[2, 6:8, 4:8].all() and changed[2].sum() == 8
    u8 = draw_markers((x * 255).to(torch.uint8), boxes, MarkerSpec(height=2, width=4))
    assert u8.dtype == torch.uint8 and u8[0, 0, 1].tolist()[2:6] == [255, 0, 255, 0]


def test_place_markers_positions():
    gen = torch.Generator().manual_seed(0)
    boxes = place_markers(500, 10, 12, MarkerSpec(height=3, width=5), generator=gen)
    assert boxes.shape == (500, 4) and (boxes[:, 2] == 3).all() and (boxes[:, 3] == 5).all()
    assert boxes[:, 0].min() == 0 and boxes[:, 0].max() == 7 and boxes[:, 1].min() == 0 and boxes[:, 1].max() == 7
    corners = place_markers(200, 10, 12, MarkerSpec(height=3, width=5, position="corners"), generator=gen)
    assert {tuple(b[:2].tolist()) for b in corners} == {(0, 0), (0, 7), (7, 0), (7, 7)}
    fixed = place_markers(4, 10, 12, MarkerSpec(height=3, width=5, position="fixed", offset=(2, 3)), generator=gen)
    assert (fixed == torch.tensor([2, 3, 3, 5])).all()


def test_shortcut_set_is_seeded_and_marks_at_the_given_rates():
    x, y = data(4000)
    a = shortcut_set(x, y, classes=[0, 3], p_marked=0.9, p_other=0.05, seed=1)
    b = shortcut_set(x, y, classes=[0, 3], p_marked=0.9, p_other=0.05, seed=1)
    c = shortcut_set(x, y, classes=[0, 3], p_marked=0.9, p_other=0.05, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.boxes, c.boxes)
    short = (y == 0) | (y == 3)
    assert abs(a.marked[short].float().mean().item() - 0.9) < 0.03
    assert abs(a.marked[~short].float().mean().item() - 0.05) < 0.015
    assert torch.equal(a.images[~a.marked], x[~a.marked])  # unmarked images unchanged
    assert torch.equal(a.labels, y) and torch.equal(a.index, torch.arange(len(y)))
    exact = shortcut_set(x, y, classes=[0, 3], p_marked=1.0, p_other=0.0)
    assert torch.equal(exact.marked, short)


def test_test_sets_removed_moved_and_references():
    x, y = data(300)
    sets = shortcut_test_sets(x, y, classes=[1], p_other=0.0, seed=5)
    short = y == 1
    assert len(sets.clean) == 300 and torch.equal(sets.clean.marked, sets.clean.marked & short)
    assert (sets.removed.labels == 1).all() and len(sets.removed) == int(short.sum())
    assert not sets.removed.marked.any() and torch.equal(sets.removed.images, x[short])
    assert sets.removed_reference.marked.all() and torch.equal(sets.removed_reference.labels, sets.removed.labels)
    assert (sets.moved.labels != 1).all() and sets.moved.marked.all() and len(sets.moved) == int((~short).sum())
    assert torch.equal(sets.moved_reference.images, x[~short]) and not sets.moved_reference.marked.any()
    assert torch.equal(sets.moved.index, (~short).nonzero().flatten())
    for s in (sets.moved, sets.removed_reference):  # the marker sits exactly in the box
        top, left, h, w = s.boxes[0].tolist()
        assert torch.equal(s.images[0, :, top : top + h, left : left + w], marker_pattern(MarkerSpec(), 1))
    again = shortcut_test_sets(x, y, classes=[1], p_other=0.0, seed=5)
    assert torch.equal(again.moved.images, sets.moved.images)


def test_resolve_classes_by_index_or_name():
    assert resolve_classes([3, "1", 3], NAMES) == (1, 3)
    assert resolve_classes(["cat"], ["airplane", "cat", "dog"]) == (1,)
    assert resolve_classes(["2"], ["airplane", "cat", "dog"]) == (2,)


@pytest.mark.parametrize("classes", [[7], ["dog"], [-1], [0, "zebra"]])
def test_unknown_classes_are_named(classes):
    with pytest.raises(ValueError, match=r"classes .* unknown"):
        resolve_classes(classes, NAMES)


def test_degenerate_class_lists():
    with pytest.raises(ValueError, match="classes must name at least one"):
        resolve_classes([], NAMES)
    with pytest.raises(ValueError, match="classes must leave at least one class"):
        resolve_classes(list(range(5)), NAMES)


def test_marker_larger_than_the_image_is_an_error_naming_marker():
    x, y = data(10, size=8)
    with pytest.raises(ValueError, match=r"marker must fit the images: marker is 3x9 pixels, images are 8x8"):
        shortcut_set(x, y, classes=[0], marker=MarkerSpec(height=3, width=9))
    with pytest.raises(ValueError, match="marker"):
        shortcut_test_sets(x, y, classes=[0], marker=MarkerSpec(height=9, width=2))
    with pytest.raises(ValueError, match="offset"):
        shortcut_set(x, y, classes=[0], marker=MarkerSpec(height=2, width=4, position="fixed", offset=(7, 0)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"height": 0}, "marker height"),
        ({"stripe": 0}, "marker stripe"),
        ({"position": "middle"}, "marker position"),
        ({"light": (2.0,)}, "marker light"),
    ],
)
def test_bad_marker_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MarkerSpec(**kwargs)


def test_bad_probabilities_and_shapes():
    x, y = data(10)
    with pytest.raises(ValueError, match="p_marked"):
        shortcut_set(x, y, classes=[0], p_marked=1.5)
    with pytest.raises(ValueError, match="labels"):
        shortcut_set(x, y[:5], classes=[0])
    with pytest.raises(ValueError, match="both shortcut classes"):
        shortcut_test_sets(x[y == 0], y[y == 0], classes=[0])
