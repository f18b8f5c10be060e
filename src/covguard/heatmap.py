"""Per-patch heatmaps: where in the image the features stop fitting.

A patch detector's :meth:`~covguard.detectors.patch.PatchMahalanobis.distance_maps` gives, for every
tapped layer, the squared distance of each ``k x k`` patch of the feature map, shape
``(N, H', W')``. This module places those maps on the input image and draws them:

- geometry: patch ``(i, j)`` of a layer with stride ``s = H / H_f`` (input side over feature-map
  side), kernel ``k`` and padding ``p`` covers the feature cells ``i - p .. i - p + k - 1``,
  i.e. the input pixels ``[(i - p) s, (i - p + k) s)`` (clipped to the image): its *footprint*.
  :func:`patch_footprints` returns these boxes and :func:`top_patch_hits` says whether the
  highest-distance patch's footprint overlaps a given box (e.g. a marker), with the chance rate
  of a patch drawn uniformly;
- drawing: :func:`heatmap_figures` overlays each layer's map on the image, one figure per image,
  every value drawn over the centre cell of its patch; the colour scale of each layer is shared
  by all the images of one call, so figures of one call compare.

Figures are built on a :class:`matplotlib.figure.Figure` with an Agg canvas, never through
``pyplot``. ``covguard heatmap`` draws them for image files
(:func:`covguard.heatmap_report.write_heatmap_report`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from covguard.detectors.patch import PatchMahalanobis

__all__ = [
    "PatchGeometry",
    "check_heatmap_layers",
    "heatmap_figures",
    "patch_footprints",
    "patch_geometry",
    "save_heatmaps",
    "score_maps",
    "top_patch_hits",
]


@dataclass(frozen=True)
class PatchGeometry:
    """Where the patches of one layer's distance map sit in the input image.

    Attributes
    ----------
    map_size : (int, int)
        ``(H', W')``, patch positions of the distance map.
    input_size : (int, int)
        ``(H, W)`` of the input image.
    kernel_size : int
        Patch side ``k`` in feature cells.
    padding : int
        Zero padding ``p`` of the feature map.
    stride : (float, float)
        Input pixels per feature cell, ``H / H_f`` and ``W / W_f``, with ``H_f = H' + k - 1 - 2p``.
    """

    map_size: tuple[int, int]
    input_size: tuple[int, int]
    kernel_size: int
    padding: int
    stride: tuple[float, float]

    def extent(self) -> tuple[float, float, float, float]:
        """``imshow`` extent (left, right, bottom, top) drawing each value over its patch's centre cell."""
        (sh, sw), (hp, wp) = self.stride, self.map_size
        offset = (self.kernel_size - 1) / 2 - self.padding  # centre cell of patch 0, in feature cells
        top, left = offset * sh - 0.5, offset * sw - 0.5
        return left, left + wp * sw, top + hp * sh, top


def patch_geometry(detector: PatchMahalanobis, layer: str, map_size: Sequence[int], input_size: Sequence[int]) -> PatchGeometry:
    """The :class:`PatchGeometry` of ``layer`` for a map of ``map_size`` from an input of ``input_size``."""
    k, p = detector.gaussians[layer].kernel_size, detector.gaussians[layer].padding
    hp, wp = int(map_size[0]), int(map_size[1])
    h, w = int(input_size[0]), int(input_size[1])
    hf, wf = hp + k - 1 - 2 * p, wp + k - 1 - 2 * p  # feature-map side
    return PatchGeometry((hp, wp), (h, w), k, p, (h / hf, w / wf))


def patch_footprints(geometry: PatchGeometry) -> Tensor:
    """Input-pixel box ``(top, left, height, width)`` covered by each patch, shape (H', W', 4), int64.

    Patch ``(i, j)`` covers feature cells ``i - p .. i - p + k - 1`` (clipped to the map), i.e.
    input rows ``[floor((i - p) s), ceil((i - p + k) s))`` clipped to ``[0, H)``; columns alike.
    """
    (hp, wp), (h, w) = geometry.map_size, geometry.input_size
    k, p = geometry.kernel_size, geometry.padding

    def spans(n: int, stride: float, size: int) -> tuple[Tensor, Tensor]:
        first = torch.arange(n, dtype=torch.float64) - p  # (n,) first feature cell of each patch
        start = (first * stride).floor().clamp(0, size)
        stop = ((first + k) * stride).ceil().clamp(0, size)
        return start.long(), (stop - start).long()

    top, height = spans(hp, geometry.stride[0], h)  # (H',)
    left, width = spans(wp, geometry.stride[1], w)  # (W',)
    grid = [t.expand(hp, wp) for t in (top[:, None], left[None, :], height[:, None], width[None, :])]
    return torch.stack(grid, dim=-1)  # (H', W', 4)


def _overlaps(a: Tensor, b: Tensor) -> Tensor:
    """Whether boxes ``(top, left, height, width)`` overlap (non-empty intersection), broadcasting."""
    rows = (a[..., 0] < b[..., 0] + b[..., 2]) & (b[..., 0] < a[..., 0] + a[..., 2])
    cols = (a[..., 1] < b[..., 1] + b[..., 3]) & (b[..., 1] < a[..., 1] + a[..., 3])
    return rows & cols & (a[..., 2] > 0) & (b[..., 2] > 0)


def top_patch_hits(maps: Tensor, boxes: Tensor, geometry: PatchGeometry) -> tuple[Tensor, Tensor]:
    """Whether each image's highest-distance patch lands on its box, and the chance of a random patch.

    Parameters
    ----------
    maps : Tensor of shape (N, H', W')
        One layer's patch distances (larger = more anomalous).
    boxes : Tensor of shape (N, 4)
        ``(top, left, height, width)`` in input pixels (e.g. the marker of each image).
    geometry : PatchGeometry
        Of the layer, from :func:`patch_geometry`.

    Returns
    -------
    hits : BoolTensor of shape (N,)
        The footprint of the patch with the largest distance (first in row-major order on ties)
        overlaps the box.
    chance : Tensor of shape (N,)
        Fraction of all patches whose footprint overlaps the box: the hit probability of a
        patch drawn uniformly at random.
    """
    if maps.ndim != 3 or tuple(maps.shape[1:]) != geometry.map_size:
        raise ValueError(f"maps must be (N, {geometry.map_size[0]}, {geometry.map_size[1]}); got {tuple(maps.shape)}")
    if boxes.shape != (maps.shape[0], 4):
        raise ValueError(f"boxes must have shape ({maps.shape[0]}, 4); got {tuple(boxes.shape)}")
    foot = patch_footprints(geometry).reshape(-1, 4)  # (L, 4)
    over = _overlaps(foot[None], boxes.long()[:, None])  # (N, L)
    top = maps.reshape(maps.shape[0], -1).double().nan_to_num(nan=float("-inf")).argmax(1)  # (N,)
    return over.gather(1, top[:, None])[:, 0], over.double().mean(1)


def check_heatmap_layers(detector: PatchMahalanobis, layers: Sequence[str] | None) -> tuple[str, ...]:
    """Validate ``layers`` against the layers the detector was fitted on (all of them when None).

    Raises
    ------
    TypeError
        If ``detector`` is not a patch detector (it has no per-patch map).
    ValueError
        Naming ``layers`` and the layers the detector was fitted on.
    """
    if not isinstance(detector, PatchMahalanobis):
        raise TypeError(
            f"detector must be a patch detector (SimpleMahalanobis, ClassMahalanobis) with distance_maps; got {type(detector).__name__}"
        )
    if layers is None:
        return tuple(detector.layers)
    if isinstance(layers, str):
        layers = [layers]
    unknown = [layer for layer in layers if layer not in detector.layers]
    if unknown or not layers:
        raise ValueError(f"layers {list(unknown or layers)} were not fitted by the detector; it was fitted on {list(detector.layers)}")
    return tuple(dict.fromkeys(layers))


@torch.no_grad()
def score_maps(detector: PatchMahalanobis, x: Tensor, *, layers: Sequence[str] | None = None, batch_size: int = 128) -> dict[str, Tensor]:
    """:meth:`~covguard.detectors.patch.PatchMahalanobis.distance_maps` in batches, on the CPU: ``{layer: (N, H', W')}`` for the requested layers."""
    layers = check_heatmap_layers(detector, layers)
    chunks = [detector.distance_maps(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return {layer: torch.cat([c[layer].cpu() for c in chunks]) for layer in layers}


def _display(image: Tensor) -> tuple[np.ndarray, str | None]:
    """(C, H, W) in [0, 1] -> array for imshow and its colormap (grey for one channel)."""
    img = image.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 3:
        return img.permute(1, 2, 0).numpy(), None  # (H, W, 3)
    return img.mean(0).numpy(), "gray"  # (H, W)


def heatmap_figures(
    detector: PatchMahalanobis,
    x: Tensor,
    *,
    layers: Sequence[str] | None = None,
    maps: Mapping[str, Tensor] | None = None,
    boxes: Tensor | None = None,
    titles: Sequence[str] | None = None,
    cmap: str = "inferno",
    alpha: float = 0.55,
    batch_size: int = 128,
) -> list[Figure]:
    """One figure per image: the image, then each layer's patch distances over it.

    Each layer's colour scale runs from the smallest to the largest distance of that layer over
    all the images of this call, so the figures of one call compare; a colour bar says the
    values (squared Mahalanobis distances). Patches are drawn over their centre cell; the border
    the valid patches do not reach shows the plain image.

    Parameters
    ----------
    detector : PatchMahalanobis
        A fitted Simple or Class patch detector.
    x : Tensor of shape (N, C, H, W)
        Images in ``[0, 1]`` (shown in grey for C = 1, RGB for C = 3, the channel mean otherwise).
    layers : sequence of str, optional
        Layers to draw, a subset of ``detector.layers``; default all.
    maps : mapping of str to Tensor of shape (N, H', W'), optional
        Precomputed :func:`score_maps` output (saves a forward pass); computed when None.
    boxes : Tensor of shape (N, 4), optional
        A box ``(top, left, height, width)`` to outline on every panel (height 0: none).
    titles : sequence of str, optional
        One title per image.
    cmap : str
        Matplotlib colormap of the distances.
    alpha : float
        Opacity of the overlay in ``[0, 1]``.
    batch_size : int
        Images per forward pass when ``maps`` is None.

    Returns
    -------
    list of Figure
        ``N`` figures, each with an Agg canvas (``fig.savefig`` works; no pyplot state).

    Raises
    ------
    ValueError
        For a layer the detector was not fitted on (naming ``layers``), mis-shaped ``x``,
        ``maps``, ``boxes`` or ``titles``.
    """
    layers = check_heatmap_layers(detector, layers)
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a tensor of shape (N, C, H, W); got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    n, (h, w) = x.shape[0], x.shape[-2:]
    if maps is None:
        maps = score_maps(detector, x, layers=layers, batch_size=batch_size)
    missing = [layer for layer in layers if layer not in maps]
    if missing:
        raise ValueError(f"maps must hold every drawn layer; missing {missing}")
    for layer in layers:
        if maps[layer].ndim != 3 or maps[layer].shape[0] != n:
            raise ValueError(f"maps[{layer!r}] must have shape ({n}, H', W'); got {tuple(maps[layer].shape)}")
    if boxes is not None and tuple(boxes.shape) != (n, 4):
        raise ValueError(f"boxes must have shape ({n}, 4); got {tuple(boxes.shape)}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles must hold one title per image ({n}); got {len(titles)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
    values = {layer: maps[layer].detach().double().cpu() for layer in layers}
    scale = {}
    for layer, m in values.items():  # shared colour scale per layer over the images of this call
        finite = m[torch.isfinite(m)]
        lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 1.0)
        scale[layer] = (lo, hi if hi > lo else lo + 1.0)
    geometry = {layer: patch_geometry(detector, layer, values[layer].shape[1:], (h, w)) for layer in layers}
    figures = []
    for i in range(n):
        fig = Figure(figsize=(2.6 * (len(layers) + 1), 2.9), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(layers) + 1, squeeze=False)[0]
        image, gray = _display(x[i])
        axes[0].imshow(image, cmap=gray, vmin=0, vmax=1, interpolation="nearest")
        axes[0].set_title("input", fontsize="small")
        axes[0].set_label("input")
        for ax, layer in zip(axes[1:], layers):
            ax.imshow(image, cmap=gray, vmin=0, vmax=1, interpolation="nearest")
            m = values[layer][i].numpy()
            im = ax.imshow(m, cmap=cmap, alpha=alpha, vmin=scale[layer][0], vmax=scale[layer][1],
                           extent=geometry[layer].extent(), interpolation="nearest")
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            ax.set_title(f"{layer} (max {np.nanmax(m):.3g})", fontsize="small")
            ax.set_label(layer)  # find a layer's panel with [ax for ax in fig.axes if ax.get_label() == layer]
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize="x-small")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
            if boxes is not None and boxes[i, 2] > 0:
                top, left, bh, bw = (int(v) for v in boxes[i])
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), bw, bh, fill=False, edgecolor="cyan", linewidth=1.2))
        if titles is not None:
            fig.suptitle(titles[i], fontsize="small")
        figures.append(fig)
    return figures


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._")
    return stem[:60] or "image"


def save_heatmaps(
    detector: PatchMahalanobis,
    x: Tensor,
    folder: str | Path,
    *,
    names: Sequence[str] | None = None,
    prefix: str = "heatmap",
    **kwargs,
) -> list[Path]:
    """Draw :func:`heatmap_figures` and save them as ``<folder>/<prefix>_<i>_<name>.png``.

    Parameters
    ----------
    detector, x
        As :func:`heatmap_figures`.
    folder : str or Path
        Created if missing.
    names : sequence of str, optional
        One name per image (e.g. the file it came from), used in the file names and as titles
        unless ``titles`` is given.
    prefix : str
        File name prefix.
    **kwargs
        Passed to :func:`heatmap_figures`.

    Returns
    -------
    list of Path
        The PNG files, in image order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if names is not None and len(names) != x.shape[0]:
        raise ValueError(f"names must hold one name per image ({x.shape[0]}); got {len(names)}")
    if names is not None and kwargs.get("titles") is None:
        kwargs["titles"] = list(names)
    figures = heatmap_figures(detector, x, **kwargs)
    paths = []
    for i, fig in enumerate(figures):
        suffix = f"_{_safe_stem(names[i])}" if names is not None else ""
        path = folder / f"{prefix}_{i:03d}{suffix}.png"
        fig.savefig(path, format="png", dpi=110)
        paths.append(path)
    return paths
