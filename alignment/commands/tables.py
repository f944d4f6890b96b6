"""Markdown, HTML and CSV tables for the after-training reports."""

from __future__ import annotations

import csv
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path

BASE = "base"  # the base model's name among the models compared (compare's column, evaluate's, sweep's)

Cell = str | float | int | None

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode's control characters (category Cc)
_CONTROL_BUT_LINE_FEED = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_CONTROL_BUT_BREAKS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # less tab and line feed


def _hex(match: re.Match) -> str:
    return f"\\x{ord(match.group()):02x}"


def visible(text: str) -> str:
    """Text with its control characters shown: a line break as ↵, any other as \\xNN (a tab as \\x09).

    For generated text in a table, where a raw control character would be invisible or break the layout."""
    return _CONTROL.sub(_hex, text.replace("\r\n", "\n").replace("\n", "↵"))


def format_cell(value: Cell) -> str:
    """Numbers to 4 significant digits; a missing value (None, NaN) as an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A GitHub-flavoured markdown table; pipes are escaped and line breaks become <br> so a cell stays one line;
    other control characters are written as \\xNN."""

    def cell(value: Cell) -> str:
        text = _CONTROL_BUT_LINE_FEED.sub(_hex, format_cell(value).replace("\r\n", "\n"))
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Cell]], *, title: str, footer: int = 0) -> str:
    """A standalone HTML page holding one table; the last `footer` rows go in <tfoot>. Text keeps its line breaks
    and tabs; other control characters (not allowed in HTML) are written as \\xNN."""

    def text(value: Cell) -> str:
        return html.escape(_CONTROL_BUT_BREAKS.sub(_hex, format_cell(value).replace("\r\n", "\n")))

    def row_html(values: Sequence[Cell], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{text(v)}</{tag}>" for v in values) + "</tr>"

    body, foot = rows[: len(rows) - footer], rows[len(rows) - footer :] if footer else []
    style = (
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:6px;vertical-align:top;white-space:pre-wrap;max-width:40em}"
        "thead th{background:#f0f0f0}tfoot td{background:#f7f7f7;font-weight:bold}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<table>\n"
        f"<thead>{row_html(header, 'th')}</thead>\n<tbody>\n"
        + "\n".join(row_html(r, "td") for r in body)
        + "\n</tbody>\n"
        + (f"<tfoot>{''.join(row_html(r, 'td') for r in foot)}</tfoot>\n" if foot else "")
        + "</table></body></html>\n"
    )


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    """Full-precision values (no rounding), missing ones empty."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
