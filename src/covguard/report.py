"""Result tables, plots and JSON files.

Plots draw on a :class:`matplotlib.figure.Figure` with an explicit
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, never through ``pyplot``: importing
covguard neither selects a backend nor registers figures with pyplot's global figure manager, so
a figure is freed as soon as the function returns and nothing needs closing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from covguard.metrics import Scores, check_scores, evaluate, roc_points

__all__ = ["is_ours", "markdown_table", "new_figure", "plot_histograms", "plot_roc", "roc_figure", "write_json"]

PathLike = str | os.PathLike[str]

#: Line colours of our detectors: strong, drawn solid and thick.
OURS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#000000", "#8c564b")
#: Line colours of the baselines: none is in :data:`OURS_COLOURS`; drawn dashed and thinner.
BASELINE_COLOURS = (
    "#9467bd", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79",
    "#bd9e39", "#7b4173", "#637939", "#6b6ecf", "#e7969c", "#9edae5",
)
#: Dash patterns cycled when there are more curves of one kind than colours.
_OURS_STYLES = ("-", (0, (8, 2)))
_BASELINE_STYLES = ("--", ":", "-.")


def _format_cell(value: object, floatfmt: str) -> str:
    """Render one table cell: floats with ``floatfmt``, ``None`` as ``-``, ``|`` escaped."""
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return format(float(value), floatfmt)
    if isinstance(value, np.generic):
        value = value.item()
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str], *, floatfmt: str = ".3f") -> str:
    """Format rows as a GitHub-flavoured markdown table.

    Parameters
    ----------
    rows : sequence of mappings
        One mapping per table row; each must have every key in ``columns`` (extra keys are
        ignored). Python and numpy floats are formatted with ``floatfmt``, ``None`` is shown as
        ``-``, anything else with ``str`` (``|`` escaped).
    columns : sequence of str
        Column keys, in order; also the header.
    floatfmt : str, default ".3f"
        Format specification for floats (:func:`format` syntax).

    Returns
    -------
    str
        Header line, separator line and one line per row, joined by newlines, no trailing newline.

    Raises
    ------
    ValueError
        If ``columns`` is empty or a row lacks one of the columns.

    Examples
    --------
    >>> print(markdown_table([{"method": "mahalanobis", "auroc": 0.98765, "fpr": None}],
    ...                      ["method", "auroc", "fpr"]))
    | method | auroc | fpr |
    | --- | --- | --- |
    | mahalanobis | 0.988 | - |
    """
    if len(columns) == 0:
        raise ValueError("columns must name at least one column; got an empty sequence")
    lines = ["| " + " | ".join(_format_cell(c, floatfmt) for c in columns) + " |", "|" + " --- |" * len(columns)]
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"rows[{i}] must have every column in {list(columns)}; missing {missing}")
        lines.append("| " + " | ".join(_format_cell(row[c], floatfmt) for c in columns) + " |")
    return "\n".join(lines)


def new_figure(width: float = 5.0, height: float = 4.0) -> Figure:
    """A ``width x height``-inch figure with constrained layout and an Agg canvas, detached from pyplot."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    """Save ``fig`` as PNG at ``path``, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def is_ours(label: str) -> bool:
    """Whether a detector name is one of covguard's patch or class-statistics detectors.

    The benchmarks name them ``simple_mahalanobis``, ``class_mahalanobis_top1``,
    ``class_mahalanobis_mixture`` and ``class_penultimate_original``; baselines carry their own
    names (``msp``, ``knn``, ``mds``, ...).
    """
    return "mahalanobis" in label or "class_penultimate" in label


def _line_styles(labels: Sequence[str]) -> dict[str, dict[str, object]]:
    """Colour, line style, width and z-order per label: ours strong and solid, baselines dashed.

    Colours are distinct while there are no more labels of a kind than its palette holds; past
    that the colours repeat with another dash pattern, so (colour, style) pairs stay distinct.
    """
    styles: dict[str, dict[str, object]] = {}
    counts = {True: 0, False: 0}
    for label in labels:
        ours = is_ours(label)
        i = counts[ours]
        counts[ours] += 1
        colours, dashes = (OURS_COLOURS, _OURS_STYLES) if ours else (BASELINE_COLOURS, _BASELINE_STYLES)
        styles[label] = {
            "color": colours[i % len(colours)],
            "linestyle": dashes[(i // len(colours)) % len(dashes)],
            "linewidth": 2.2 if ours else 1.3,
            "zorder": 3 if ours else 2,
        }
    return styles


def roc_figure(curves: Mapping[str, tuple[Scores, Scores]], *, title: str = "") -> Figure:
    """One ROC curve per label (shifted samples positive) on one axes, legend outside it.

    Our detectors (:func:`is_ours`) are drawn first in the legend, in strong solid lines on top;
    baselines in dashed, thinner lines; every curve has its own colour.

    Parameters
    ----------
    curves : mapping of str to (scores_in, scores_out)
        Legend label -> scores of in-distribution samples, array-like or Tensor of shape (N_in,),
        and of shifted samples, shape (N_out,); larger = more anomalous. The legend shows the
        AUROC of each curve.
    title : str, default ""
        Axes title; none when empty.

    Returns
    -------
    Figure
        With an Agg canvas (``fig.savefig`` works; no pyplot state).

    Raises
    ------
    ValueError
        If ``curves`` is empty or a score set is invalid (see :func:`covguard.metrics.check_scores`).
    """
    if len(curves) == 0:
        raise ValueError("curves must map at least one label to (scores_in, scores_out); got an empty mapping")
    labels = sorted(curves, key=lambda label: not is_ours(label))  # stable: ours first, each kind in given order
    styles = _line_styles(labels)
    fig = new_figure(8.5, 4.4)
    ax = fig.add_subplot()
    for label in labels:
        scores_in, scores_out = curves[label]
        fpr, tpr = roc_points(scores_in, scores_out)
        auroc = evaluate(scores_in, scores_out).auroc
        ax.plot(fpr, tpr, label=f"{label} (AUROC {auroc:.3f})", **styles[label])
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle=":", color="0.6", linewidth=1.0, label="chance", zorder=1)
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), xlabel="FPR (in-distribution flagged)", ylabel="TPR (shifted flagged)")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small", frameon=False)
    return fig


def plot_roc(curves: Mapping[str, tuple[Scores, Scores]], path: PathLike, *, title: str = "") -> Path:
    """Draw :func:`roc_figure` and save it as PNG.

    Parameters
    ----------
    curves : mapping of str to (scores_in, scores_out)
        As :func:`roc_figure`.
    path : str or path-like
        Output PNG file; parent directories are created.
    title : str, default ""
        Axes title; none when empty.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``curves`` is empty or a score set is invalid (see :func:`covguard.metrics.check_scores`).
    """
    return _save(roc_figure(curves, title=title), path)


def plot_histograms(
    scores_in: Scores,
    scores_out: Scores,
    path: PathLike,
    *,
    label_in: str = "in-distribution",
    label_out: str = "shifted",
    title: str = "",
    bins: int = 50,
) -> Path:
    """Overlay density histograms of two score sets and save them as PNG.

    Both histograms share ``bins`` bins over the range of the finite scores. ``+inf`` scores are
    not plotted: their counts are appended to the title, and the mean and standard deviation in the
    legend are those of the finite scores.

    Parameters
    ----------
    scores_in : array-like or Tensor of shape (N_in,)
        Scores of in-distribution samples (larger = more anomalous).
    scores_out : array-like or Tensor of shape (N_out,)
        Scores of shifted samples.
    path : str or path-like
        Output PNG file; parent directories are created.
    label_in, label_out : str
        Legend labels of the two sets.
    title : str, default ""
        Axes title; the ``+inf`` counts are appended when there are any.
    bins : int, default 50
        Number of bins, at least 1.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``bins`` < 1 or a score set is invalid (see :func:`covguard.metrics.check_scores`).
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1; got {bins!r}")
    sets = [(check_scores(scores_in, "scores_in"), label_in), (check_scores(scores_out, "scores_out"), label_out)]
    finite = [s[np.isfinite(s)] for s, _ in sets]
    n_inf = [s.size - v.size for (s, _), v in zip(sets, finite)]
    edges = np.histogram_bin_edges(np.concatenate(finite), bins=int(bins))
    fig = new_figure()
    ax = fig.add_subplot()
    for (_, label), values, color in zip(sets, finite, ("tab:blue", "tab:orange")):
        if values.size == 0:
            ax.plot([], [], color=color, label=f"{label} (all +inf)")
            continue
        ax.hist(
            values,
            bins=edges,
            density=True,
            alpha=0.5,
            color=color,
            label=f"{label} (mean {values.mean():.3g}, std {values.std():.3g})",
        )
    if any(n_inf):
        note = "+inf, not plotted: " + ", ".join(f"{n} {label}" for n, (_, label) in zip(n_inf, sets))
        title = f"{title}\n{note}" if title else note
    if title:
        ax.set_title(title, fontsize="medium")
    ax.set(xlabel="score (larger = more anomalous)", ylabel="density")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _to_json(obj: object) -> object:
    """``json`` fallback: dataclasses, numpy scalars and arrays, paths."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"write_json cannot serialise objects of type {type(obj).__name__}")


def write_json(obj: object, path: PathLike) -> Path:
    """Write ``obj`` as JSON with sorted keys and an indent of 2.

    Dataclass instances are written through their ``to_dict()`` when they have one, else
    :func:`dataclasses.asdict`; numpy scalars and arrays become Python numbers and lists; paths
    become strings. Non-finite floats are written as ``NaN`` / ``Infinity``, which :mod:`json`
    reads back.

    Parameters
    ----------
    obj : object
        JSON-serialisable data, possibly containing the types above at any depth.
    path : str or path-like
        Output file; parent directories are created.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    TypeError
        If ``obj`` contains an object of another type that :mod:`json` cannot serialise.
    """
    text = json.dumps(obj, default=_to_json, sort_keys=True, indent=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path
