"""The document model of the reports: blocks (headings, paragraphs, tables, lists, charts, code) and their two
renderers, Markdown (`summary.md`, the page, the model cards) and one self-contained HTML page (`report.html`).

What a run's document says is in `sections.py`; nothing here knows a summary.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    """A paragraph; `code` and **bold** are the only markup."""

    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    wrap: bool = False  # long text cells wrap (at spaces) instead of scrolling


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Figure:
    """A chart of `charts.CHARTS`, by key (drawn in HTML only)."""

    key: str


@dataclass
class Code:
    text: str


Block = Heading | Para | Table | Bullets | Figure | Code


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (pipes inside cells escaped)."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def to_markdown(blocks: Sequence[Block]) -> str:
    """The document as Markdown (charts are left out: Markdown readers get the PNGs)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(md_table(block.header, block.rows))
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Code):
            parts.append(f"```\n{block.text}\n```")
    return "\n\n".join(p for p in parts if p) + "\n"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em;overflow-wrap:anywhere}
.table-wrap{overflow-x:auto;max-width:100%;margin:1em 0}table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}
table.wrap td{white-space:normal;min-width:10em;text-align:left}
.status{background:#fff4e5;border-left:4px solid #d55e00;padding:.5em 1em}
code{background:#f6f8fa;padding:0 .2em;overflow-wrap:anywhere}
pre{background:#f6f8fa;padding:1em;overflow:auto}.figure{margin:1.5em 0}"""

_CODE = re.compile(r"`([^`]*)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline_html(text: str) -> str:
    """Escape `text` and render the two bits of Markdown the documents use: `code` and **bold**."""
    out = html.escape(text, quote=False)
    return _BOLD.sub(r"<strong>\1</strong>", _CODE.sub(r"<code>\1</code>", out))


def _html_table(table: Table) -> str:
    """A table in a horizontally scrolling box: on a narrow screen the table scrolls, its cells never break a word or
    a number (`wrap` lets long text cells wrap at spaces)."""
    head = "".join(f"<th>{_inline_html(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    cls = ' class="wrap"' if table.wrap else ""
    return f'<div class="table-wrap"><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def to_html(blocks: Sequence[Block], figures: dict[str, Any], *, title: str) -> str:
    """The document as one self-contained page (plotly.js inlined once, with the first chart; no network)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    first_chart = True
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            cls = ' class="status"' if block.text.startswith("**This run") else ""
            out.append(f"<p{cls}>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            out.append(_html_table(block))
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Code):
            out.append(f"<pre>{html.escape(block.text, quote=False)}</pre>")
        elif isinstance(block, Figure) and figures.get(block.key) is not None:
            fig = figures[block.key]
            div = fig.to_html(
                full_html=False,
                include_plotlyjs=first_chart,
                include_mathjax=False,
                default_width="100%",
                default_height=f"{int(fig.layout.height or 480)}px",
                config={"displaylogo": False, "responsive": True},
            )
            first_chart = False
            out.append(f'<div class="figure" id="chart-{block.key}">{div}</div>')
    out.append("</body></html>")
    return "\n".join(out)
