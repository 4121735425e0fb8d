"""The HTML of a report page: one self-contained file (inline CSS, figures as inline SVG, images as base64
PNG data URIs; no script, no external URL), sections with a table of contents.

A section is a `Section(id, title, body)`; `Section.omitted(id, title, why)` is the one-line note a report
shows in place of a section whose inputs are missing."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg); margin: 0;
       background: #fff; }
header { background: #24292f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; color: #d0d7de; }
.layout { display: flex; align-items: flex-start; }
nav { position: sticky; top: 0; width: 220px; flex: none; padding: 16px 12px 16px 24px; font-size: 13px;
      max-height: 100vh; overflow-y: auto; }
nav ol { padding-left: 18px; margin: 0; }
nav li { margin: 4px 0; }
nav a { color: var(--accent); text-decoration: none; }
nav .omitted a { color: var(--muted); }
main { flex: 1; min-width: 0; padding: 8px 32px 48px 8px; max-width: 1180px; }
section { border-bottom: 1px solid var(--line); padding: 8px 0 20px; }
h2 { font-size: 18px; margin: 18px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
p.note { color: var(--muted); font-style: italic; margin: 4px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
.card { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 18px; }
.card span { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 10px; font-size: 12px;
      max-height: 360px; overflow: auto; }
details summary { cursor: pointer; color: var(--accent); }
.side { display: flex; flex-wrap: wrap; gap: 32px; align-items: flex-start; }
th { font-weight: 600; }
.figs { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.figs svg { max-width: 100%; height: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 6px; font-size: 12px; background: #fff; }
.tile img { display: block; margin: 0 auto 4px; image-rendering: auto; max-width: 100%; }
.tile .pair { display: flex; gap: 4px; justify-content: center; }
.tile .wrong { color: #cf222e; }
.montage { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 10px; }
.montage img { max-width: 100%; display: block; }
.legend-true { color: #1a7f37; font-weight: bold; } .legend-pred { color: #cf222e; font-weight: bold; }
"""


@dataclass
class Section:
    id: str
    title: str
    body: str
    omitted: bool = False

    @classmethod
    def note(cls, id: str, title: str, why: str) -> Section:
        """The one line shown instead of a section whose inputs are missing."""
        return cls(id, title, f'<p class="note">Omitted: {esc(why)}.</p>', omitted=True)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int | Sequence[int] = 4) -> str:
    """An HTML table; numbers right-aligned, formatted to `digits` decimals (one for all columns, or one per
    column); a cell already HTML is given as `Raw`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    per_column = [digits] * len(header) if isinstance(digits, int) else list(digits)
    body = []
    for row in rows:
        cells = []
        for v, digits in zip(row, per_column):
            if isinstance(v, Raw):
                cells.append(f"<td>{v}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{esc(fmt(v, digits))}</td>')
            else:
                cells.append(f"<td>{esc(fmt(v, digits))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def kv(rows: Iterable[tuple[str, Any]], digits: int = 2) -> str:
    """A two-column table of names and values, without a header."""
    num = ' class="num"'
    body = "".join(f"<tr><th>{esc(k)}</th><td{num if isinstance(v, (int, float)) and not isinstance(v, bool) else ''}>"
                   f"{esc(fmt(v, digits))}</td></tr>" for k, v in rows)
    return f'<div class="scroll"><table><tbody>{body}</tbody></table></div>'


class Raw(str):
    """HTML that a table cell takes as is."""


def cards(items: Iterable[tuple[str, Any]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{esc(fmt(v))}</b><span>{esc(k)}</span></div>' for k, v in items) + "</div>"


def png_uri(image, fmt_: str = "PNG") -> str:
    """A PIL image as a data: URI (base64 PNG)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt_, optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(image, alt: str, title: str = "") -> str:
    t = f' title="{esc(title)}"' if title else ""
    return f'<img src="{png_uri(image)}" width="{image.width}" height="{image.height}" alt="{esc(alt)}"{t}>'


def render(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    toc = "".join(f'<li class="{"omitted" if s.omitted else ""}"><a href="#{esc(s.id)}">{esc(s.title)}</a></li>'
                  for s in sections)
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    stamp = f"written {datetime.now():%Y-%m-%d %H:%M}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)} &middot; {stamp}</p></header>"
            f'<div class="layout"><nav><b>Contents</b><ol>{toc}</ol></nav><main>{body}</main></div>'
            f"</body></html>\n")
