"""Arrow tables as text: an aligned table, CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from typing import Any, Sequence

import pyarrow as pa


def positive_int(text: str) -> int:
    """argparse type for a row count: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of rows >= 1")
    return value


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        text = ""
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_cell(v, max_width) for v in value) + "]"
    else:
        text = str(value)
    text = text.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def format_table(table: pa.Table, max_width: int = 60) -> str:
    """Render an Arrow table as an aligned text table (numbers right-aligned)."""
    names = table.column_names
    if not names:
        return "(no columns)"
    rows = [[_cell(row[n], max_width) for n in names] for row in table.to_pylist()]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type)
               for f in table.schema]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in rows)
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(out)


def _format_csv(table: pa.Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow(["" if row[n] is None else row[n] for n in table.column_names])
    return buf.getvalue().rstrip("\n")


def _format_json(table: pa.Table) -> str:
    return json.dumps(table.to_pylist(), default=str, ensure_ascii=False, indent=1)


def render(table: pa.Table, fmt: str, max_width: int) -> str:
    if fmt == "csv":
        return _format_csv(table)
    if fmt == "json":
        return _format_json(table)
    return format_table(table, max_width)


def output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--max-width", type=int, default=60, help="truncate table cells (default 60)")
