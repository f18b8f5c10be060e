"""The subset of GitHub markdown that covguard writes, converted to HTML (for ``report.html``).

:func:`markdown_to_html` handles headings, paragraphs, bullet lists, pipe tables (as
:func:`covguard.report.markdown_table` writes them; numeric cells right-aligned), images
``![alt](file.png)`` (a block of image lines becomes a grid of captioned figures), links,
``code``, **bold** and *emphasis*. All text is escaped: the markdown cannot inject markup.
"""

from __future__ import annotations

import html
import os
import re
from urllib.parse import quote, unquote

__all__ = ["figure_html", "heading_id", "markdown_to_html"]

_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_IMAGE_LINE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?%?( ± [-+]?\d+(\.\d*)?%?)?$")


def _url(target: str) -> str:
    """Quote a link target for an attribute (keeps ``/``, ``:``, ``#``, ``%`` as they are)."""
    return html.escape(quote(target, safe="/:#%?=&@+,;~"), quote=True)


def _inline(text: str) -> str:
    """Escape ``text`` and convert inline markdown: code spans, images, links, bold, emphasis."""
    out, last = [], 0
    for match in re.finditer(r"`([^`]+)`", text):  # code spans first: nothing inside is converted
        out.append(_inline_plain(text[last : match.start()]))
        out.append(f"<code>{html.escape(match.group(1))}</code>")
        last = match.end()
    out.append(_inline_plain(text[last:]))
    return "".join(out)


def _inline_plain(text: str) -> str:
    text = text.replace("\\|", "|")
    pieces, last = [], 0
    for match in re.finditer(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", text):
        pieces.append(_emphasis(html.escape(text[last : match.start()], quote=False)))
        bang, label, target = match.groups()
        if bang:
            pieces.append(f'<img src="{_url(target)}" alt="{html.escape(label)}">')
        else:
            pieces.append(f'<a href="{_url(target)}">{_emphasis(html.escape(label, quote=False))}</a>')
        last = match.end()
    pieces.append(_emphasis(html.escape(text[last:], quote=False)))
    return "".join(pieces)


def _emphasis(escaped: str) -> str:
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", escaped)


def _cells(line: str) -> list[str]:
    """Split a pipe-table row on unescaped ``|``, dropping the outer pipes."""
    line = line.strip()
    line = line.removeprefix("|")
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)]


def _table(lines: list[str]) -> str:
    header, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr></thead>", "<tbody>"]
    for row in rows:
        row = (row + [""] * len(header))[: max(len(header), len(row))]
        cells = "".join(
            f'<td class="num">{_inline(c)}</td>' if _NUMBER.match(c.replace("\\|", "|")) else f"<td>{_inline(c)}</td>"
            for c in row
        )
        out.append(f"<tr>{cells}</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def heading_id(text: str, used: set[str]) -> str:
    """A URL fragment id for a heading, unique among ``used`` (to which it is added)."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def markdown_to_html(text: str, *, heading_offset: int = 0, ids: set[str] | None = None) -> str:
    """Convert covguard's markdown subset to HTML (see the module docstring).

    Parameters
    ----------
    text : str
        Markdown.
    heading_offset : int
        Added to every heading level (``1`` turns ``#`` into ``<h2>``), capped at 6.
    ids : set of str, optional
        Heading ids already used on the page; the new ones are added (one page, unique ids).

    Returns
    -------
    str
        HTML fragment; all text is escaped, so the markdown cannot inject markup.

    Examples
    --------
    >>> print(markdown_to_html("| a | b |\\n| --- | --- |\\n| x | 0.5 |"))
    <table>
    <thead><tr><th>a</th><th>b</th></tr></thead>
    <tbody>
    <tr><td>x</td><td class="num">0.5</td></tr>
    </tbody>
    </table>
    """
    ids = set() if ids is None else ids
    lines = text.splitlines()
    out: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []

    def flush() -> None:
        images = [_IMAGE_LINE.match(line.strip()) for line in paragraph]
        if paragraph and all(images):  # a block of images only: a grid of captioned figures
            out.append('<div class="figures">\n' + "\n".join(figure_html(unquote(m.group(2)), m.group(1)) for m in images) + "\n</div>")
        elif paragraph:
            out.append("<p>" + _inline(" ".join(line.strip() for line in paragraph)) + "</p>")
        paragraph.clear()
        if items:
            out.append("<ul>\n" + "\n".join(f"<li>{_inline(item)}</li>" for item in items) + "\n</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = min(len(heading.group(1)) + heading_offset, 6)
            title = heading.group(2)
            out.append(f'<h{level} id="{heading_id(title, ids)}">{_inline(title)}</h{level}>')
        elif stripped.startswith("|") and i + 1 < len(lines) and _TABLE_SEPARATOR.match(lines[i + 1]):
            flush()
            block = [line, lines[i + 1]]
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
            continue
        elif re.match(r"^[-*]\s+", stripped):
            if paragraph:
                flush()
            items.append(re.sub(r"^[-*]\s+", "", stripped))
        elif items and line.startswith((" ", "\t")):
            items[-1] += " " + stripped  # continuation of a list item
        else:
            if items:
                flush()
            paragraph.append(line)
        i += 1
    flush()
    return "\n".join(out)


def figure_html(name: str, alt: str = "") -> str:
    """A captioned ``<figure>`` showing (and linking) the image file ``name``, a relative path."""
    src = _url(name.replace(os.sep, "/"))
    caption = html.escape(name.rsplit("/", 1)[-1])
    alt = html.escape(alt or name.rsplit("/", 1)[-1])
    return f'<figure><a href="{src}"><img src="{src}" alt="{alt}" loading="lazy"></a><figcaption>{caption}</figcaption></figure>'
