"""CSV exports that a spreadsheet opens as text, never as formulas.

A patient code typed as ``=HYPERLINK("http://evil.example","x")`` would run as a formula when a doctor opens the
export in a spreadsheet (CSV injection, OWASP). A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return gets a leading apostrophe, which spreadsheets show as text; numbers stay numbers.
"""

from __future__ import annotations

import csv
import io

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def to_csv(header: list[str], rows) -> str:
    """``rows``: lists of cells in ``header`` order, or dicts keyed by it (missing keys are empty)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for row in rows:
        cells = [row.get(k, "") for k in header] if isinstance(row, dict) else row
        w.writerow([safe_cell("" if c is None else c) for c in cells])
    return buf.getvalue()
