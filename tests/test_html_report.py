"""Static HTML report: markdown conversion, figures by relative path, every reference exists, offline."""

import re

import pytest

from covguard.html_report import Section, add_html_report, referenced_files, write_html_report
from covguard.markdown_html import markdown_to_html
from covguard.report import markdown_table

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # the page only links files; their content is not read


def test_markdown_table_round_trip():
    rows = [{"method": "a|b", "auroc": 0.98765, "fpr": None}, {"method": "<script>", "auroc": 1.0, "fpr": 0.5}]
    html = markdown_to_html(markdown_table(rows, ["method", "auroc", "fpr"]))
    assert html == (
        "<table>\n"
        "<thead><tr><th>method</th><th>auroc</th><th>fpr</th></tr></thead>\n"
        "<tbody>\n"
        '<tr><td>a|b</td><td class="num">0.988</td><td>-</td></tr>\n'
        '<tr><td>&lt;script&gt;</td><td class="num">1.000</td><td class="num">0.500</td></tr>\n'
        "</tbody>\n"
        "</table>"
    )


def test_markdown_blocks_and_inline():
    text = (
        "# Title\n\nSome *emphasis*, **bold**, `a<b>` and [a link](results.json).\nSame paragraph.\n\n"
        "- one\n- two `x`\n\n## Sub\n\n![ROC](roc%20a.png)\n![hist](hist.png)\n\nText after: 91.2 ± 0.4 and a*b*c."
    )
    html = markdown_to_html(text)
    assert '<h1 id="title">Title</h1>' in html and '<h2 id="sub">Sub</h2>' in html
    assert "<p>Some <em>emphasis</em>, <strong>bold</strong>, <code>a&lt;b&gt;</code> and " in html
    assert '<a href="results.json">a link</a>. Same paragraph.</p>' in html
    assert "<ul>\n<li>one</li>\n<li>two <code>x</code></li>\n</ul>" in html
    assert '<div class="figures">' in html and 'src="roc%20a.png"' in html and 'alt="ROC"' in html
    assert "<figcaption>roc a.png</figcaption>" in html
    assert "a*b*c" in html  # no emphasis inside words
    assert markdown_to_html("# T", heading_offset=1) == '<h2 id="t">T</h2>'


def test_markdown_cannot_inject_markup():
    html = markdown_to_html('<img src=x onerror="alert(1)"> [x](javascript:alert(1)")')
    assert "<img" not in html and "&lt;img" in html


@pytest.fixture
def folder(tmp_path):
    for name in ("roc_a.png", "hist_a.png", "heatmap_000.png", "samples.png", "other.png"):
        (tmp_path / name).write_bytes(PNG)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep fig.png").write_bytes(PNG)
    return tmp_path


def check_page(path):
    """Every file the page references exists, and nothing is fetched from the network."""
    refs = referenced_files(path)
    missing = [r for r in refs if not (path.parent / r).is_file()]
    assert not missing, missing
    text = path.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the page must open offline"
    assert "<script" not in text
    return refs


def test_write_html_report_references_existing_figures(folder):
    sections = [
        Section("Tables", "| a | b |\n| --- | --- |\n| x | 1 |"),
        Section("Figures", "Inline: ![s](samples.png)", ("roc_a.png", "sub/deep fig.png")),
        Section("", "no title"),
    ]
    path = write_html_report(folder, "My <report>", sections)
    assert path == folder / "report.html"
    refs = check_page(path)
    assert refs == ["samples.png", "roc_a.png", "sub/deep fig.png"]  # anchors of the contents are not files
    text = path.read_text()
    assert "<title>My &lt;report&gt;</title>" in text and '<a href="#tables">Tables</a>' in text
    assert 'src="sub/deep%20fig.png"' in text


@pytest.mark.parametrize(
    "section, match",
    [
        (Section("x", "", ("missing.png",)), r"sections\[0\]\.figures names 'missing.png'"),
        (Section("x", "", ("../escape.png",)), r"sections\[0\]\.figures must be a path inside"),
        (Section("x", "", ("/etc/passwd",)), r"sections\[0\]\.figures must be a path inside"),
        (Section("x", "![m](gone.png)"), r"sections\[0\]\.markdown names 'gone.png'"),
    ],
)
def test_missing_or_outside_figures_are_errors(folder, section, match):
    with pytest.raises(ValueError, match=match):
        write_html_report(folder, "t", [section])
    assert not (folder / "report.html").exists()


def test_referenced_files_keeps_local_paths_only(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(
        '<a href="#top">x</a><a href="https://example.com/a.png">x</a><img src="data:image/png;base64,AAA">'
        '<img src="a%20b.png?x=1#f"><a href="dir/c.json">c</a><img src="/abs.png"><img src="a%20b.png">'
    )
    assert referenced_files(page) == ["a b.png", "dir/c.json"]


def test_add_html_report_from_results_md(folder):
    (folder / "results.md").write_text(
        "# Bench title\n\nIntro.\n\n## Table\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n![roc](roc_a.png)\n\n## More\n\ntext\n"
    )
    (folder / "results.json").write_text("{}")
    path = add_html_report(folder)
    refs = check_page(path)
    text = path.read_text()
    assert "<title>Bench title</title>" in text and text.count("<h1") == 1
    assert refs.count("roc_a.png") == 1  # shown by the markdown, not appended again
    for name in ("hist_a.png", "heatmap_000.png", "samples.png", "other.png", "results.json"):
        assert name in refs
    assert "Score histograms" in text and "Heatmaps" in text and "Other figures" in text
    assert refs.index("hist_a.png") < refs.index("heatmap_000.png") < refs.index("other.png")


def test_add_html_report_needs_results_md(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.md"):
        add_html_report(tmp_path)
