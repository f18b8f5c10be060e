"""Shortcut data: a spurious marker that predicts some classes, built reproducibly from real images.

A model trained where a small synthetic marker (a ruler-like striped bar) appears on most images
of some classes and rarely on the others can learn the marker instead of the object, looks fine
on data marked as in training, and fails when the marker is missing or moved. This module draws
the marker and builds the three data sets of the shortcut benchmark from any labelled images:

- the training set (and any in-distribution split): marked with probability ``p_marked`` on the
  images of the shortcut ``classes`` and ``p_other`` on the others;
- test set (a) ``clean``: the test images marked exactly as in training;
- test set (b) ``removed``: the test images of the shortcut classes, with no marker;
- test set (c) ``moved``: the test images of the other classes, each with a marker.

(b) and (c) come with their ``reference``: the same images in the condition the training set
made familiar (marked for (b), unmarked for (c)), so that an error of the model "because of the
shortcut" can be told apart (right on the reference, wrong on the shifted image).

Everything is deterministic for a given ``seed`` (a private ``torch.Generator``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "POSITIONS",
    "MarkerSpec",
    "ShortcutSet",
    "ShortcutTestSets",
    "draw_markers",
    "marker_pattern",
    "place_markers",
    "resolve_classes",
    "shortcut_set",
    "shortcut_test_sets",
]

#: Where markers go: anywhere the bar fits, one of the four corners, or one fixed place.
POSITIONS = ("random", "corners", "fixed")


@dataclass(frozen=True)
class MarkerSpec:
    """A ruler-like striped bar.

    The bar is ``height x width`` pixels; along its long side it alternates light and dark stripes
    ``stripe`` pixels wide (the ticks of a ruler), starting with a light one.

    Attributes
    ----------
    height, width : int
        Size of the bar in pixels, each >= 1.
    stripe : int
        Width of each stripe in pixels, >= 1.
    light : tuple of float
        Value of the light stripes in ``[0, 1]``: one value (every channel) or one per channel.
    dark : tuple of float
        Value of the dark stripes, as ``light``.
    position : {"random", "corners", "fixed"}
        ``"random"``: top-left corner uniform over the places where the bar fits;
        ``"corners"``: one of the four image corners, uniformly; ``"fixed"``: at ``offset``.
    offset : (int, int)
        Top-left corner (row, column) for ``position="fixed"``.
    """

    height: int = 3
    width: int = 8
    stripe: int = 1
    light: tuple[float, ...] = (1.0,)
    dark: tuple[float, ...] = (0.0,)
    position: str = "random"
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name in ("height", "width", "stripe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"marker {name} must be an integer >= 1; got {value!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"marker position must be one of {POSITIONS}; got {self.position!r}")
        for name in ("light", "dark"):
            values = getattr(self, name)
            if len(values) == 0 or not all(0.0 <= float(v) <= 1.0 for v in values):
                raise ValueError(f"marker {name} must hold 1 or C values in [0, 1]; got {values!r}")
        if len(self.offset) != 2 or any(int(v) < 0 for v in self.offset):
            raise ValueError(f"marker offset must be (row, column) >= 0; got {self.offset!r}")

    def check_fits(self, height: int, width: int) -> None:
        """Raise ValueError (naming ``marker``) unless the bar fits a ``height x width`` image."""
        if self.height > height or self.width > width:
            raise ValueError(
                f"marker must fit the images: marker is {self.height}x{self.width} pixels, images are {height}x{width}"
            )
        if self.position == "fixed":
            row, col = self.offset
            if row + self.height > height or col + self.width > width:
                raise ValueError(
                    f"marker at offset {tuple(self.offset)} with size {self.height}x{self.width} does not fit "
                    f"{height}x{width} images"
                )


@dataclass(frozen=True, eq=False)
class ShortcutSet:
    """Images with labels and the box of the marker drawn on each (if any).

    Attributes
    ----------
    images : Tensor of shape (N, C, H, W)
        float in ``[0, 1]`` or uint8 in ``[0, 255]`` (the dtype of the source images).
    labels : Tensor of shape (N,), int64
    boxes : Tensor of shape (N, 4), int64
        ``(top, left, height, width)`` of the marker; ``(-1, -1, 0, 0)`` where there is none.
    index : Tensor of shape (N,), int64
        Position of each image in the source images it was built from.
    """

    images: Tensor
    labels: Tensor
    boxes: Tensor
    index: Tensor

    @property
    def marked(self) -> Tensor:
        """BoolTensor of shape (N,): whether the image carries a marker."""
        return self.boxes[:, 2] > 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def float(self) -> Tensor:
        """The images as float32 in ``[0, 1]``, shape (N, C, H, W)."""
        if self.images.dtype == torch.uint8:
            return self.images.to(torch.float32).div_(255.0)
        return self.images.to(torch.float32)


@dataclass(frozen=True, eq=False)
class ShortcutTestSets:
    """The benchmark's test sets, see the module docstring.

    ``removed_reference`` / ``moved_reference`` hold the same images as ``removed`` / ``moved``
    in the training condition (marked at the same box / unmarked).
    """

    clean: ShortcutSet
    removed: ShortcutSet
    moved: ShortcutSet
    removed_reference: ShortcutSet
    moved_reference: ShortcutSet


def resolve_classes(classes: Sequence[int | str], names: Sequence[str]) -> tuple[int, ...]:
    """Turn a list of class indices or names into sorted distinct indices.

    Parameters
    ----------
    classes : sequence of int or str
        Indices in ``0..K-1`` or names from ``names`` (a string of digits counts as a name if
        ``names`` holds it, else as an index).
    names : sequence of str
        The ``K`` class names.

    Raises
    ------
    ValueError
        Naming ``classes`` and the unknown entries, listing the known classes; for an empty
        list, or one that names every class (no class would be left to move the marker to).
    """
    if isinstance(classes, (str, int)):
        classes = [classes]
    names = [str(n) for n in names]
    out, unknown = [], []
    for c in classes:
        if isinstance(c, str) and c in names:
            out.append(names.index(c))
        elif isinstance(c, (int, str)) and not isinstance(c, bool) and str(c).lstrip("-").isdigit() and 0 <= int(c) < len(names):
            out.append(int(c))
        else:
            unknown.append(c)
    if unknown:
        raise ValueError(
            f"classes {unknown} are unknown; known classes are indices 0..{len(names) - 1} or names {names}"
        )
    out = sorted(set(out))
    if not out:
        raise ValueError("classes must name at least one shortcut class; got an empty list")
    if len(out) == len(names):
        raise ValueError(f"classes must leave at least one class without the shortcut; got all {len(names)} classes")
    return tuple(out)


def _values(values: tuple[float, ...], channels: int, name: str) -> Tensor:
    if len(values) not in (1, channels):
        raise ValueError(f"marker {name} must hold 1 or C={channels} values; got {len(values)}")
    return torch.tensor(values, dtype=torch.float32).expand(channels)  # (C,)


def marker_pattern(marker: MarkerSpec, channels: int) -> Tensor:
    """The bar as float32 pixels in ``[0, 1]``, shape (channels, height, width).

    Stripes alternate along the long side (columns when ``width >= height``), light first.
    """
    along = max(marker.height, marker.width)
    light_stripe = (torch.arange(along) // marker.stripe) % 2 == 0  # (along,)
    mask = light_stripe[None, :] if marker.width >= marker.height else light_stripe[:, None]
    mask = mask.expand(marker.height, marker.width)  # (h, w)
    light = _values(marker.light, channels, "light")[:, None, None]  # (C, 1, 1)
    dark = _values(marker.dark, channels, "dark")[:, None, None]
    return torch.where(mask[None], light, dark)  # (C, h, w)


def place_markers(n: int, height: int, width: int, marker: MarkerSpec, *, generator: torch.Generator) -> Tensor:
    """Boxes ``(top, left, height, width)`` for ``n`` markers, shape (n, 4), int64.

    Raises
    ------
    ValueError
        If the marker does not fit ``height x width`` images (naming ``marker``).
    """
    marker.check_fits(height, width)
    h, w = marker.height, marker.width
    if marker.position == "random":
        top = torch.randint(0, height - h + 1, (n,), generator=generator)
        left = torch.randint(0, width - w + 1, (n,), generator=generator)
    elif marker.position == "corners":
        corner = torch.randint(0, 4, (n,), generator=generator)
        top = torch.where(corner // 2 == 0, 0, height - h)
        left = torch.where(corner % 2 == 0, 0, width - w)
    else:
        top = torch.full((n,), marker.offset[0])
        left = torch.full((n,), marker.offset[1])
    return torch.stack([top, left, torch.full((n,), h), torch.full((n,), w)], dim=1).long()  # (n, 4)


def draw_markers(images: Tensor, boxes: Tensor, marker: MarkerSpec) -> Tensor:
    """Copy of ``images`` with the marker painted at each box (rows with height 0 are left as they are).

    Parameters
    ----------
    images : Tensor of shape (N, C, H, W)
        float in ``[0, 1]`` or uint8.
    boxes : Tensor of shape (N, 4)
        ``(top, left, height, width)`` as from :func:`place_markers`; ``height`` must be 0 or
        ``marker.height`` (and ``width`` likewise).
    marker : MarkerSpec

    Returns
    -------
    Tensor of shape (N, C, H, W)
        Same dtype as ``images``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must have shape ({images.shape[0]}, 4); got {tuple(boxes.shape)}")
    marker.check_fits(*images.shape[-2:])
    pattern = marker_pattern(marker, images.shape[1])  # (C, h, w)
    if images.dtype == torch.uint8:
        pattern = (pattern * 255).round().to(torch.uint8)
    else:
        pattern = pattern.to(images.dtype)
    out = images.clone()
    for i in (boxes[:, 2] > 0).nonzero().flatten().tolist():
        top, left, h, w = boxes[i].tolist()
        out[i, :, top : top + h, left : left + w] = pattern
    return out


def _no_boxes(n: int) -> Tensor:
    return torch.tensor([-1, -1, 0, 0]).repeat(n, 1)  # (n, 4)


def _check_probability(value: float, name: str) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1]; got {value!r}")


def _check_images(images: Tensor, labels: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (N, C, H, W); got {got}")
    if not isinstance(labels, Tensor) or labels.shape != (images.shape[0],):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape ({images.shape[0]},); got {got}")


def shortcut_set(
    images: Tensor,
    labels: Tensor,
    *,
    classes: Sequence[int],
    marker: MarkerSpec = MarkerSpec(),
    p_marked: float = 0.95,
    p_other: float = 0.02,
    seed: int = 0,
) -> ShortcutSet:
    """Mark images as in the shortcut training set.

    Each image of a shortcut class carries the marker with probability ``p_marked``, each other
    image with probability ``p_other``; positions follow ``marker.position``.

    Parameters
    ----------
    images : Tensor of shape (N, C, H, W)
        float in ``[0, 1]`` or uint8.
    labels : Tensor of shape (N,), int64
    classes : sequence of int
        Shortcut class indices (see :func:`resolve_classes` for names).
    marker : MarkerSpec
    p_marked, p_other : float
        Marking probabilities of the shortcut classes and of the others.
    seed : int
        Seed of the draws (which images, where).

    Returns
    -------
    ShortcutSet

    Raises
    ------
    ValueError
        For a marker larger than the images (naming ``marker``), probabilities outside [0, 1],
        mis-shaped inputs.

    Examples
    --------
    >>> x, y = torch.zeros(6, 1, 8, 8), torch.tensor([0, 0, 0, 1, 1, 1])
    >>> data = shortcut_set(x, y, classes=[0], marker=MarkerSpec(height=2, width=4), p_marked=1.0, p_other=0.0)
    >>> data.marked.tolist()
    [True, True, True, False, False, False]
    >>> top, left, h, w = data.boxes[0].tolist()
    >>> data.images[0, 0, top, left : left + w].tolist()
    [1.0, 0.0, 1.0, 0.0]
    """
    _check_images(images, labels)
    _check_probability(p_marked, "p_marked")
    _check_probability(p_other, "p_other")
    marker.check_fits(*images.shape[-2:])
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    in_classes = torch.isin(labels, torch.tensor(list(classes), dtype=labels.dtype))  # (N,)
    prob = torch.where(in_classes, float(p_marked), float(p_other))  # (N,)
    marked = torch.rand(n, generator=gen) < prob
    boxes = place_markers(n, *images.shape[-2:], marker, generator=gen)  # (N, 4)
    boxes = torch.where(marked[:, None], boxes, _no_boxes(n))
    return ShortcutSet(draw_markers(images, boxes, marker), labels.clone(), boxes, torch.arange(n))


def _subset(images: Tensor, labels: Tensor, rows: Tensor, boxes: Tensor, marker: MarkerSpec) -> ShortcutSet:
    return ShortcutSet(draw_markers(images[rows], boxes, marker), labels[rows].clone(), boxes, rows.clone())


def shortcut_test_sets(
    images: Tensor,
    labels: Tensor,
    *,
    classes: Sequence[int],
    marker: MarkerSpec = MarkerSpec(),
    p_marked: float = 0.95,
    p_other: float = 0.02,
    seed: int = 0,
) -> ShortcutTestSets:
    """The benchmark's test sets from test images: (a) clean, (b) removed, (c) moved.

    Parameters
    ----------
    images : Tensor of shape (N, C, H, W)
        Unmarked test images, float in ``[0, 1]`` or uint8.
    labels : Tensor of shape (N,), int64
    classes, marker, p_marked, p_other, seed
        As :func:`shortcut_set`; use a ``seed`` other than the training set's.

    Returns
    -------
    ShortcutTestSets
        ``clean``: all images, marked as in training. ``removed``: the images of the shortcut
        classes without marker; ``removed_reference``: the same with a marker. ``moved``: the
        images of the other classes with a marker; ``moved_reference``: the same without.
        Markers of (b)'s reference and (c) are at freshly drawn positions.
    """
    clean = shortcut_set(images, labels, classes=classes, marker=marker, p_marked=p_marked, p_other=p_other, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    boxes = place_markers(images.shape[0], *images.shape[-2:], marker, generator=gen)  # (N, 4)
    in_classes = torch.isin(labels, torch.tensor(list(classes), dtype=labels.dtype))  # (N,)
    short, other = in_classes.nonzero().flatten(), (~in_classes).nonzero().flatten()
    if len(short) == 0 or len(other) == 0:
        raise ValueError(
            f"the test images must hold both shortcut classes {list(classes)} and other classes; "
            f"got {len(short)} and {len(other)} images"
        )
    return ShortcutTestSets(
        clean=clean,
        removed=_subset(images, labels, short, _no_boxes(len(short)), marker),
        moved=_subset(images, labels, other, boxes[other], marker),
        removed_reference=_subset(images, labels, short, boxes[short], marker),
        moved_reference=_subset(images, labels, other, _no_boxes(len(other)), marker),
    )
