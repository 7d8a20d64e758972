"""The one table writer: Markdown (for reports and the terminal) and CSV, from header and rows.

Every table gradleak writes goes through here: compare's ``table.md``/``table.csv``, the audit's
``audit.md``/``audit.csv``, a sweep's ``table.md``/``table.csv``, the Flower audit's
``audits.md``/``audits.csv`` and the benchmarks' printed tables.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def cell(value: Any, digits: int = 3) -> str:
    """One cell as text: ``n/a`` for None, floats to ``digits`` decimals, anything else as ``str``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, aligned: bool = False) -> str:
    """A Markdown table; ``aligned`` pads the columns (for a terminal)."""
    cells = [[str(h) for h in headers]] + [[v if isinstance(v, str) else cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))] if aligned else [0] * len(headers)

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    rule = ("|" + "|".join("-" * (w + 2) for w in widths) + "|") if aligned else "|" + "---|" * len(headers)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def write_markdown(path: str | Path, headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   title: str | None = None, notes: Sequence[str] = ()) -> Path:
    """Write a Markdown table (with an optional title line above and notes below) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = ([title, ""] if title else []) + [markdown(headers, rows)] + (["", *notes] if notes else [])
    path.write_text("\n".join(parts) + "\n")
    return path


def write_csv(path: str | Path, keys: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts) as CSV with the columns ``keys`` (other keys are left out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
