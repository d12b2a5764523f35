"""Self-contained HTML building blocks: escaping, value formatting, tables, embedded PNG figures,
and the :class:`Report` / :class:`Section` containers with their page template.

Nothing here references an external resource: styles are inline, figures are base64 ``data:`` URIs,
there is no script, and fonts are the reader's system fonts. The file opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["escape", "format_value", "table_html", "key_value_html", "figure_to_data_uri", "Section", "Report"]


def escape(text) -> str:
    """HTML-escape any value's string form (``&``, ``<``, ``>``, both quote characters).

    Parameters
    ----------
    text
        Any value; ``str(text)`` is escaped.

    Returns
    -------
    str
        Text safe to put in HTML content and attribute values.
    """
    return html.escape(str(text), quote=True)


def format_value(value, *, pvalue: bool = False) -> str:
    """Readable text for a table cell: integers with thousands separators, floats with 3 significant
    digits (scientific when tiny or huge), p-values as ``1.2e-05``, sequences joined by commas.

    ``None``, NaN and ``pd.NA`` give an empty string; booleans give ``"yes"``/``"no"``.

    Parameters
    ----------
    value
        The value to show.
    pvalue
        Format a number as a p-value: 2 significant digits, scientific below 1e-3.

    Returns
    -------
    str
        The text (not HTML-escaped).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if pvalue:
            return f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}"
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(value, (list, tuple, np.ndarray, pd.Index, set, frozenset)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "section"


def table_html(
    df: pd.DataFrame,
    *,
    formatters: Mapping[str, Callable[[object], str]] | None = None,
    pvalue_columns: Sequence[str] = ("pval", "padj", "pvalue", "p_value", "fdr", "padj_global", "qval"),
    row_classes: Sequence[str] | None = None,
    numeric_align: bool = True,
    index: bool = False,
) -> str:
    """An escaped HTML ``<table>`` of a DataFrame.

    ``formatters`` maps column name to a function returning the (unescaped) cell text; p-value
    columns get scientific formatting; ``row_classes`` gives one CSS class per row (e.g. ``"muted"``).

    Parameters
    ----------
    df
        The table to render; column names are shown with underscores as spaces.
    formatters
        ``{column: function(value) -> str}`` for columns that need their own formatting; other cells use
        :func:`format_value`. The returned text is escaped afterwards.
    pvalue_columns
        Column names formatted as p-values.
    row_classes
        One CSS class per row (``""`` or ``None`` for none), e.g. ``"muted"`` or ``"group-start"``.
    numeric_align
        Right-align numeric columns.
    index
        Include the DataFrame's index as the first column(s).

    Returns
    -------
    str
        The ``<table>`` element as HTML.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}.")
    if row_classes is not None and len(row_classes) != len(df):
        raise ValueError(f"row_classes has {len(row_classes)} entries for {len(df)} rows.")
    frame = df.reset_index() if index else df
    formatters = dict(formatters or {})
    pcols = {str(c) for c in pvalue_columns}
    numeric = {c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])} if numeric_align else set()
    num_cls = ' class="num"'
    head = "".join(
        f"<th{num_cls if c in numeric else ''}>{escape(str(c).replace('_', ' '))}</th>" for c in frame.columns
    )
    body = []
    for i, row in enumerate(frame.itertuples(index=False, name=None)):
        cells = []
        for col, value in zip(frame.columns, row):
            if col in formatters:
                text = formatters[col](value)
            else:
                text = format_value(value, pvalue=str(col) in pcols)
            cells.append(f"<td{num_cls if col in numeric else ''}>{escape(text)}</td>")
        rc = f' class="{escape(row_classes[i])}"' if row_classes is not None and row_classes[i] else ""
        body.append(f"<tr{rc}>{''.join(cells)}</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def key_value_html(items: Mapping, *, caption: str | None = None) -> str:
    """A two-column table of ``name: value`` pairs (names with underscores shown as spaces)."""
    rows = "".join(
        f"<tr><th>{escape(str(k).replace('_', ' '))}</th><td>{escape(format_value(v))}</td></tr>"
        for k, v in items.items()
    )
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table class="kv">{cap}<tbody>{rows}</tbody></table>'


def figure_to_data_uri(fig: Figure, *, dpi: int = 110) -> tuple[str, int, int]:
    """Render a figure to PNG and return ``(data_uri, width_px, height_px)``.

    Parameters
    ----------
    fig
        A matplotlib :class:`~matplotlib.figure.Figure` (left open).
    dpi
        Resolution of the PNG.

    Returns
    -------
    tuple of (str, int, int)
        The ``data:image/png;base64,...`` URI and the PNG's width and height in pixels.
    """
    if not isinstance(fig, Figure):
        raise ValueError(f"expected a matplotlib Figure, got {type(fig).__name__}.")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    png = buf.getvalue()
    # Width and height sit big-endian in the IHDR chunk at bytes 16..24 of every PNG.
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii"), width, height


class Section:
    """One titled part of a report: an introductory paragraph, then figures, tables, text and notes.

    Content is rendered to HTML as it is added (a figure becomes a PNG right away), so a section
    holds no matplotlib objects and memory stays flat however many figures a report has.

    Every ``add_*`` method returns the section, so calls can be chained.

    Parameters
    ----------
    title
        The section heading (non-empty).
    intro
        Optional introductory text, added as the first paragraph.
    anchor
        HTML id of the section (the table of contents links to it); default a slug of the title.
    """

    def __init__(self, title: str, intro: str | None = None, *, anchor: str | None = None):
        if not str(title).strip():
            raise ValueError("a section needs a non-empty title.")
        self.title = str(title)
        self.anchor = anchor or _slug(self.title)
        self._parts: list[str] = []
        self.n_figures = 0
        if intro:
            self.add_paragraph(intro, css_class="intro")

    def add_paragraph(self, text: str, *, css_class: str | None = None) -> "Section":
        """Add plain text (escaped; blank lines start new paragraphs).

        Parameters
        ----------
        text
            The text; whitespace inside a paragraph is collapsed.
        css_class
            CSS class of the ``<p>`` elements (e.g. ``"intro"``, ``"note"``).

        Returns
        -------
        Section
            ``self``.
        """
        cls = f' class="{escape(css_class)}"' if css_class else ""
        for para in re.split(r"\n\s*\n", str(text).strip()):
            if para.strip():
                self._parts.append(f"<p{cls}>{escape(' '.join(para.split()))}</p>")
        return self

    def add_note(self, text: str) -> "Section":
        """Add a short highlighted note (e.g. why a part was skipped).

        Parameters
        ----------
        text
            The note (escaped).

        Returns
        -------
        Section
            ``self``.
        """
        self._parts.append(f'<p class="note">{escape(text)}</p>')
        return self

    def add_figure(self, fig: Figure, *, caption: str | None = None, alt: str | None = None,
                   dpi: int = 110, close: bool = True) -> "Section":
        """Embed a figure as a base64 PNG with an optional caption; ``alt`` defaults to the caption.

        Parameters
        ----------
        fig
            A matplotlib Figure.
        caption
            Text shown under the figure.
        alt
            Alternative text of the image; default the caption, else the section title.
        dpi
            Resolution of the PNG; the image is displayed at 100 dpi-equivalent, so higher values are
            sharper on high-density screens, not larger.
        close
            Clear the figure after rendering (frees its artists).

        Returns
        -------
        Section
            ``self``.
        """
        uri, width, height = figure_to_data_uri(fig, dpi=dpi)
        if close:
            fig.clear()  # frees the artists; the figure was never registered with pyplot
        alt_text = alt or caption or self.title
        cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
        # Displayed at 100 dpi-equivalent so that the PNG stays sharp on high-density screens.
        shown = max(1, round(width * 100 / dpi))
        self._parts.append(
            f'<figure><img src="{uri}" alt="{escape(alt_text)}" width="{shown}" '
            f'data-width="{width}" data-height="{height}">{cap}</figure>'
        )
        self.n_figures += 1
        return self

    def add_table(self, df: pd.DataFrame, *, caption: str | None = None, **kwargs) -> "Section":
        """Add a DataFrame as an escaped HTML table (keyword arguments go to :func:`table_html`).

        Parameters
        ----------
        df
            The table.
        caption
            Text shown under the table.
        **kwargs
            ``formatters``, ``pvalue_columns``, ``row_classes``, ``numeric_align``, ``index`` of
            :func:`table_html`.

        Returns
        -------
        Section
            ``self``.
        """
        cap = f'<p class="caption">{escape(caption)}</p>' if caption else ""
        self._parts.append(f'<div class="table-wrap">{table_html(df, **kwargs)}</div>{cap}')
        return self

    def add_key_values(self, items: Mapping, *, caption: str | None = None) -> "Section":
        """Add a small ``name: value`` table.

        Parameters
        ----------
        items
            Mapping of names (underscores shown as spaces) to values (formatted by :func:`format_value`).
        caption
            Title of the table.

        Returns
        -------
        Section
            ``self``.
        """
        self._parts.append(key_value_html(items, caption=caption))
        return self

    def to_html(self) -> str:
        """The section as HTML.

        Returns
        -------
        str
            A ``<section>`` element with its heading and content.
        """
        return (f'<section id="{escape(self.anchor)}"><h2>{escape(self.title)}</h2>'
                + "\n".join(self._parts) + "</section>")


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: #1d2330;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 40px; background: #fff; min-height: 100vh;
  box-shadow: 0 0 0 1px #e3e6eb; }
header h1 { margin: 0 0 4px; font-size: 1.7em; }
header .subtitle { margin: 0 0 14px; color: #566176; }
h2 { margin: 34px 0 8px; padding-top: 10px; border-top: 2px solid #e3e6eb; font-size: 1.3em; }
p { margin: 8px 0; max-width: 72em; }
p.intro { color: #2f3747; }
p.note { background: #fff7e0; border-left: 4px solid #e0b000; padding: 6px 10px; color: #5a4a00; }
p.caption, figcaption { color: #566176; font-size: 0.92em; margin-top: 4px; }
figure { margin: 12px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eceff3; }
.table-wrap { overflow-x: auto; margin: 10px 0 4px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e6e9ee; text-align: left; vertical-align: top; }
thead th { background: #eef1f5; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.muted td { color: #8a93a3; }
tr.group-start td { border-top: 2px solid #cfd5de; }
table.kv { margin: 6px 24px 10px 0; display: inline-table; vertical-align: top; }
table.kv caption { text-align: left; font-weight: 600; padding: 2px 0 4px; white-space: nowrap; }
table.kv th { font-weight: 500; color: #566176; background: none; position: static; }
nav.toc { margin: 10px 0 4px; font-size: 0.93em; display: flex; flex-wrap: wrap; gap: 2px 16px; }
nav.toc a { color: #2457a6; text-decoration: none; white-space: nowrap; }
nav.toc a:hover { text-decoration: underline; }
footer { margin-top: 40px; padding-top: 12px; border-top: 2px solid #e3e6eb; color: #566176; font-size: 0.88em; }
footer p { margin: 4px 0; }
@media print { body { background: #fff; } main { box-shadow: none; } thead th { position: static; } }
"""


class Report:
    """An HTML report: a header (title, subtitle, key-value blocks, notes), sections and a footer.

    >>> report = Report("My run")
    >>> section = report.add_section("Results", "What the figure shows ...")
    >>> section.add_figure(fig, caption="...")            # doctest: +SKIP
    >>> report.write("report.html")                       # doctest: +SKIP

    Parameters
    ----------
    title
        Page title (the ``<title>`` and the main heading).
    subtitle
        Optional line under the title.
    """

    def __init__(self, title: str, *, subtitle: str | None = None):
        self.title = str(title)
        self.subtitle = subtitle
        self.header_blocks: list[tuple[str, Mapping]] = []
        self.header_notes: list[str] = []
        self.sections: list[Section] = []
        self.footer_lines: list[str] = []

    def add_header_block(self, caption: str, items: Mapping) -> None:
        """A ``name: value`` table shown in the header (e.g. dataset summary, run parameters).

        Parameters
        ----------
        caption
            Title of the table.
        items
            Mapping of names to values; an empty mapping adds nothing.
        """
        if items:
            self.header_blocks.append((caption, dict(items)))

    def add_header_note(self, text: str) -> None:
        """Add a highlighted note to the header (e.g. a warning about the run).

        Parameters
        ----------
        text
            The note (escaped when rendered).
        """
        self.header_notes.append(str(text))

    def add_footer(self, text: str) -> None:
        """Add a line to the page footer (e.g. software versions, date).

        Parameters
        ----------
        text
            The line (escaped when rendered).
        """
        self.footer_lines.append(str(text))

    def add_section(self, title: str | Section, intro: str | None = None) -> Section:
        """Append a section (a new one from ``title`` and ``intro``, or a :class:`Section` object).

        A section whose anchor is already taken gets ``-2``, ``-3``, ... appended to it.

        Parameters
        ----------
        title
            Heading of a new section, or a :class:`Section` to append as it is.
        intro
            Introductory text of a new section (ignored when ``title`` is a Section).

        Returns
        -------
        Section
            The appended section, to add content to.
        """
        section = title if isinstance(title, Section) else Section(title, intro)
        taken = {s.anchor for s in self.sections}
        base, k = section.anchor, 2
        while section.anchor in taken:  # anchors must be unique for the table of contents
            section.anchor, k = f"{base}-{k}", k + 1
        self.sections.append(section)
        return section

    def to_html(self) -> str:
        """The whole page as a string.

        Returns
        -------
        str
            A complete, self-contained HTML document (inline CSS, embedded images, no scripts).
        """
        toc = "".join(f'<a href="#{escape(s.anchor)}">{escape(s.title)}</a>' for s in self.sections)
        blocks = "".join(key_value_html(items, caption=cap) for cap, items in self.header_blocks)
        notes = "".join(f'<p class="note">{escape(n)}</p>' for n in self.header_notes)
        subtitle = f'<p class="subtitle">{escape(self.subtitle)}</p>' if self.subtitle else ""
        footer = "".join(f"<p>{escape(line)}</p>" for line in self.footer_lines)
        body = "\n".join(s.to_html() for s in self.sections)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header><h1>{escape(self.title)}</h1>{subtitle}<div>{blocks}</div>{notes}"
            f'<nav class="toc">{toc}</nav></header>\n{body}\n<footer>{footer}</footer>\n'
            "</main>\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the page (UTF-8) atomically: a temporary file next to ``path`` renamed into place, so a
        reader never sees a half-written file and a failure (a full disk) leaves ``path`` as it was.

        Parameters
        ----------
        path
            File to write (not a directory).
        overwrite
            Replace an existing file; ``False`` raises ``FileExistsError`` instead.

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        from .._io import atomic_write_text

        path = Path(path)
        if path.exists() and path.is_dir():
            raise ValueError(f"{path} is a directory; pass a file path such as {path / 'report.html'}.")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        atomic_write_text(path, self.to_html())
        return path
