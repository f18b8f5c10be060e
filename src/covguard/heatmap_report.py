"""Heatmaps of image files: what ``covguard heatmap`` writes.

:func:`write_heatmap_report` decodes the images of a folder, tar archive or file (as
``covguard score`` does), draws one heatmap figure per image (:func:`covguard.heatmap.save_heatmaps`)
and writes a ``report.html`` with a table of each image's predicted class, score and largest
patch distance per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from covguard.detectors.patch import PatchMahalanobis
from covguard.features import model_device, model_dtype
from covguard.guard import decode_image, iter_images
from covguard.heatmap import check_heatmap_layers, save_heatmaps, score_maps
from covguard.html_report import Section, write_html_report
from covguard.report import markdown_table

__all__ = ["HeatmapReport", "write_heatmap_report"]


@dataclass(frozen=True)
class HeatmapReport:
    """The files one :func:`write_heatmap_report` call wrote.

    Attributes
    ----------
    figures : tuple of Path
        One PNG per decoded image, in input order.
    failed : tuple of (str, str)
        ``(image name, error)`` of each file that could not be decoded.
    page : Path
        The ``report.html`` showing the figures and the table.
    """

    figures: tuple[Path, ...]
    failed: tuple[tuple[str, str], ...]
    page: Path


def write_heatmap_report(
    detector: PatchMahalanobis,
    images: str | Path,
    out: str | Path,
    *,
    layers: list[str] | None = None,
    max_images: int = 32,
    alpha: float = 0.55,
    cmap: str = "inferno",
    batch_size: int = 64,
    description: str = "",
    progress: bool = True,
) -> HeatmapReport:
    """Draw the heatmaps of the images in ``images`` and write them with ``report.html`` to ``out``.

    Parameters
    ----------
    detector : PatchMahalanobis
        A fitted patch detector attached to its model (e.g. from :func:`covguard.load`).
    images : str or Path
        Folder (recursive), tar archive or image file. Each image is decoded to the detector's
        fitted input shape (:func:`covguard.guard.decode_image`).
    out : str or Path
        Folder for the PNGs and ``report.html`` (created).
    layers : list of str, optional
        Layers to draw, among those the detector was fitted on; default all.
    max_images : int
        Draw at most this many images (the first ones decoded).
    alpha, cmap
        Opacity and colormap of the overlay (:func:`covguard.heatmap.heatmap_figures`).
    batch_size : int
        Images per forward pass.
    description : str
        Where the detector and model came from, shown at the top of the page.
    progress : bool
        Show a progress bar while decoding.

    Returns
    -------
    HeatmapReport

    Raises
    ------
    ValueError
        Naming the argument: ``max_images`` or ``batch_size`` < 1, a layer the detector was not
        fitted on, ``images`` without any decodable image file.
    TypeError
        If ``detector`` is not a patch detector.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1; got {max_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    layers = check_heatmap_layers(detector, layers)
    model = detector.model
    channels, height, width = detector.input_shape_
    dtype = model_dtype(model)
    total, files = iter_images(images)
    if total == 0:
        raise ValueError(f"images {str(images)!r} holds no image files (suffixes: .png, .jpg, ...)")
    names, xs, failed = [], [], []
    for name, data in tqdm(files, total=total, desc="decode", unit="img", disable=not progress):
        if len(names) == max_images:
            break
        try:
            xs.append(decode_image(data, channels=channels, size=(height, width)))
            names.append(name)
        except ValueError as err:
            failed.append((name, str(err)))
    if not xs:
        raise ValueError(f"images {str(images)!r}: no image could be decoded ({failed[0][1] if failed else 'none'})")
    x = torch.stack(xs).to(dtype)  # (N, C, H, W)
    maps = score_maps(detector, x, layers=layers, batch_size=batch_size)
    device = model_device(model)
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
        scores = torch.cat([detector.score(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)])
    titles = [f"{name}: class {int(c)}, score {float(s):.3g}" for name, c, s in zip(names, logits.argmax(1), scores)]
    out = Path(out)
    paths = save_heatmaps(detector, x, out, names=names, layers=layers, maps=maps, titles=titles, cmap=cmap, alpha=alpha)
    rows = [
        {"image": name, "figure": path.name, "predicted class": int(c), "score": float(s),
         **{f"max d2 {layer}": float(maps[layer][i].max()) for layer in layers}}
        for i, (name, path, c, s) in enumerate(zip(names, paths, logits.argmax(1), scores))
    ]
    table = markdown_table(rows, ["image", "figure", "predicted class", "score", *[f"max d2 {layer}" for layer in layers]], floatfmt=".4g")
    text = f"{description}; images from `{images}`." if description else f"Images from `{images}`."
    text += " Scores: larger = more anomalous. Colour scales are shared per layer across these images."
    if failed:
        text += "\n\nNot decoded: " + ", ".join(f"`{n}` ({e})" for n, e in failed)
    sections = [Section("Images", f"{text}\n\n{table}"), Section("Heatmaps", "", tuple(p.name for p in paths))]
    page = write_html_report(out, "covguard heatmaps", sections)
    return HeatmapReport(tuple(paths), tuple(failed), page)
