"""One static HTML page per benchmark folder: tables, ROC curves, histograms and heatmaps, offline.

A benchmark writes ``results.json``, ``results.md`` and PNG figures into one folder; this module
adds ``report.html`` next to them. The page has no scripts, no external style sheets and no
network references: it embeds its CSS and points at the PNGs of the folder by relative path, so
the folder can be zipped, moved or opened from disk as it is.

- :func:`write_html_report` writes a page from explicit :class:`Section` objects;
- :func:`add_html_report` builds it from an existing ``results.md`` plus the folder's PNGs
  (those the markdown does not already show are appended, grouped by file-name prefix);
- :func:`covguard.markdown_html.markdown_to_html` converts the markdown covguard writes;
- :func:`referenced_files` lists the local files a page references (tests check they exist).
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from covguard.markdown_html import figure_html, heading_id, markdown_to_html

__all__ = ["Section", "add_html_report", "referenced_files", "write_html_report"]

REPORT_NAME = "report.html"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 90%; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; font-size: 90%; }
nav ul { columns: 2; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 1px solid #d0d7de; padding: .5em; background: #fff; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 85%; color: #57606a; text-align: center; }
p img { max-width: 100%; }
"""

_FIGURE_GROUPS = (
    ("roc", "ROC curves"),
    ("hist", "Score histograms"),
    ("heatmap", "Heatmaps"),
    ("localization", "Localization"),
)


@dataclass(frozen=True)
class Section:
    """One section of the page.

    Attributes
    ----------
    title : str
        Section heading (``<h2>``); none when empty.
    markdown : str
        Body text in the markdown subset of :func:`~covguard.markdown_html.markdown_to_html`.
    figures : tuple of str
        PNG (or other image) files, relative to the report folder, shown after the text.
    """

    title: str
    markdown: str = ""
    figures: tuple[str, ...] = ()


def _check_figure(folder: Path, name: str, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} must be a file name relative to the report folder; got {name!r}")
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{where} must be a path inside the report folder {str(folder)!r}; got {name!r}")
    if not (folder / path).is_file():
        raise ValueError(f"{where} names {name!r}, which is not a file in the report folder {str(folder)!r}")


def write_html_report(folder: str | os.PathLike[str], title: str, sections: Sequence[Section], *, filename: str = REPORT_NAME) -> Path:
    """Write a static, offline HTML page into ``folder``.

    Parameters
    ----------
    folder : str or path-like
        The report folder; it must exist and hold every figure the sections name.
    title : str
        Page title and ``<h1>``.
    sections : sequence of Section
        In page order; a table of contents links the titled ones.
    filename : str
        Name of the page in ``folder``.

    Returns
    -------
    Path
        The page, ``folder / filename``.

    Raises
    ------
    ValueError
        If ``folder`` is not a folder, or a section names a figure (in ``figures`` or as a
        markdown image) that is not a file inside it (naming ``sections[i].figures`` or
        ``sections[i].markdown``).
    TypeError
        If an entry of ``sections`` is not a :class:`Section`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder must be an existing folder; got {str(folder)!r}")
    sections = list(sections)
    for i, section in enumerate(sections):
        if not isinstance(section, Section):
            raise TypeError(f"sections[{i}] must be a Section; got {type(section).__name__}")
        for name in section.figures:
            _check_figure(folder, name, f"sections[{i}].figures")
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", section.markdown):
            if not urlsplit(target).scheme:
                _check_figure(folder, unquote(target), f"sections[{i}].markdown")
    ids: set[str] = {"contents"}
    body = [f"<h1>{html.escape(title)}</h1>"]
    toc, parts = [], []
    for section in sections:
        if section.title:
            anchor = heading_id(section.title, ids)
            toc.append(f'<li><a href="#{anchor}">{html.escape(section.title)}</a></li>')
            parts.append(f'<h2 id="{anchor}">{html.escape(section.title)}</h2>')
        if section.markdown:
            parts.append(markdown_to_html(section.markdown, heading_offset=2 if section.title else 1, ids=ids))
        if section.figures:
            parts.append('<div class="figures">\n' + "\n".join(figure_html(name) for name in section.figures) + "\n</div>")
    if len(toc) > 1:
        body.append('<nav id="contents"><ul>\n' + "\n".join(toc) + "\n</ul></nav>")
    body += parts
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    path = folder / filename
    path.write_text(page, encoding="utf-8")
    return path


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"img": "src", "source": "src", "script": "src", "a": "href", "link": "href", "iframe": "src"}.get(tag)
        for key, value in attrs:
            if key == wanted and value:
                self.found.append(value)


def referenced_files(html_path: str | os.PathLike[str]) -> list[str]:
    """The local files a page references, relative to its folder, in order of first appearance.

    Collects ``src`` of ``img``/``source``/``script``/``iframe`` and ``href`` of ``a``/``link``,
    keeps the relative ones (no scheme such as ``http:`` or ``data:``, not a bare ``#anchor``,
    not absolute) and drops query and fragment; percent-escapes are decoded.

    Parameters
    ----------
    html_path : str or path-like

    Returns
    -------
    list of str
        Paths relative to the page's folder (``(Path(html_path).parent / p).exists()`` checks one).
    """
    parser = _References()
    parser.feed(Path(html_path).read_text(encoding="utf-8"))
    out: list[str] = []
    for value in parser.found:
        parts = urlsplit(value)
        if parts.scheme or parts.netloc or not parts.path or parts.path.startswith("/"):
            continue
        path = unquote(parts.path)
        if path not in out:
            out.append(path)
    return out


def add_html_report(out_dir: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Build ``report.html`` from a benchmark folder's ``results.md`` and its PNG figures.

    The markdown is rendered as it is (its ``# `` title becomes the page title unless ``title``
    is given; each ``## `` part becomes a section of the table of contents). PNGs of the folder
    that the markdown does not show are appended in sections by file-name prefix (``roc_*``,
    ``hist_*``, ``heatmap_*``, ``localization*``, the rest under "Other figures"), in sorted
    order. A link to ``results.json`` is added when it exists.

    Parameters
    ----------
    out_dir : str or path-like
        A benchmark's report folder holding ``results.md``.
    title : str, optional
        Page title; default the markdown's first ``# `` heading, else the folder name.

    Returns
    -------
    Path
        ``out_dir / "report.html"``.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``results.md``.
    """
    folder = Path(out_dir)
    md_path = folder / "results.md"
    if not md_path.is_file():
        raise FileNotFoundError(f"out_dir {str(folder)!r} has no results.md to build report.html from")
    text = md_path.read_text(encoding="utf-8")
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None and re.match(r"^#\s+", lines[first]):
        title = title or re.sub(r"^#\s+", "", lines[first]).strip()
        lines = lines[first + 1 :]
    title = title or folder.resolve().name
    sections, current, body = [], "", []
    for line in lines:
        match = re.match(r"^##\s+(.*?)\s*$", line)
        if match:
            if current or "".join(body).strip():
                sections.append(Section(current, "\n".join(body)))
            current, body = match.group(1), []
        else:
            body.append(line)
    if current or "".join(body).strip():
        sections.append(Section(current, "\n".join(body)))
    shown = set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text))
    pngs = sorted(p.name for p in folder.glob("*.png") if p.name not in shown)
    for prefix, heading in _FIGURE_GROUPS:
        group = [name for name in pngs if name.startswith(prefix)]
        if group:
            sections.append(Section(heading, "", tuple(group)))
    rest = [name for name in pngs if not any(name.startswith(prefix) for prefix, _ in _FIGURE_GROUPS)]
    if rest:
        sections.append(Section("Other figures", "", tuple(rest)))
    if (folder / "results.json").is_file():
        sections.append(Section("Raw results", "All numbers, machine-readable: [results.json](results.json)."))
    return write_html_report(folder, title, sections)
