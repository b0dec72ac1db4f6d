"""``msif``: a small command line over the lake.

    msif sql "<query>" [--lake DIR] [--format table|csv|json]
    msif top <query_id> [--method ms-if] [--k 10] [--damping X] [--model FT_HASH]
    msif status

The lake root comes from ``--lake``, else ``$MSIF_LAKE``, else ``./lake``.

Commands form a registry: each is a ``register(subparsers)`` function that adds a
subparser and sets ``handler=<fn(args) -> exit code>``. Built-in commands live here;
other packages add theirs by exposing ``register(subparsers)`` in one of
PLUGIN_MODULES (``msif_assets/defs/cli.py`` adds ``demo``, ``materialize``, ``refresh``). Plugins should
build their subparser with ``parents=[lake_option()]`` and read the root with
``lake_root(args)``, and import heavy libraries inside their handler, not at import.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

__all__ = ["main", "build_parser", "lake_option", "lake_root", "format_table", "PLUGIN_MODULES", "COMMANDS"]

ENV_LAKE = "MSIF_LAKE"
PLUGIN_MODULES = ("msif_assets.defs.cli",)
Register = Callable[[Any], None]


def lake_option() -> argparse.ArgumentParser:
    """A parent parser adding ``--lake DIR`` to a subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--lake", default=None, metavar="DIR",
                        help=f"lake root (default: ${ENV_LAKE} or ./lake)")
    return parent


def lake_root(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "lake", None) or os.environ.get(ENV_LAKE) or "lake")


# -- output ------------------------------------------------------------------
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


def _render(table: pa.Table, fmt: str, max_width: int) -> str:
    if fmt == "csv":
        return _format_csv(table)
    if fmt == "json":
        return _format_json(table)
    return format_table(table, max_width)


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--max-width", type=int, default=60, help="truncate table cells (default 60)")


# -- built-in commands ---------------------------------------------------------
def _cmd_sql(args: argparse.Namespace) -> int:
    from msif_assets.lake.catalog import Catalog

    with Catalog.open(lake_root(args)) as catalog:
        print(_render(catalog.query(args.query), args.format, args.max_width))
    return 0


def register_sql(subparsers: Any) -> None:
    p = subparsers.add_parser("sql", parents=[lake_option()], help="run a read-only SQL query on the catalog",
                              description="Views: documents, chunks, queries, candidates, influence, "
                              "influence_with_text, top_k, mlp_attn_share, shard_summary, rejects, eval_*.")
    p.add_argument("query", help='e.g. "SELECT * FROM top_k LIMIT 5"')
    _output_options(p)
    p.set_defaults(handler=_cmd_sql)


_TOP_SQL = """
WITH latest AS (
  SELECT ft_model FROM influence WHERE query_id = $query_id AND method = $method
  ORDER BY computed_at DESC LIMIT 1)
SELECT rank, score, score_mlp, score_attn, damping_kind, damping, doc_id, chunk_id, shard, chunk_text
FROM influence_with_text
WHERE query_id = $query_id AND method = $method AND rank <= $k
  AND ft_model = coalesce($model, (SELECT ft_model FROM latest))
  AND ($damping IS NULL OR damping = $damping)
ORDER BY pt_model, damping_kind, damping, rank
"""


def _cmd_top(args: argparse.Namespace) -> int:
    from msif_assets.lake.catalog import Catalog

    params = {"query_id": args.query_id, "method": args.method, "k": args.k,
              "model": args.model, "damping": args.damping}
    with Catalog.open(lake_root(args)) as catalog:
        query = catalog.query("SELECT prompt, completion FROM queries WHERE query_id = $query_id",
                              {"query_id": args.query_id}).to_pylist()
        top = catalog.query(_TOP_SQL, params)
        if top.num_rows == 0:
            methods = catalog.query("SELECT DISTINCT method FROM influence WHERE query_id = $q ORDER BY 1",
                                    {"q": args.query_id}).column("method").to_pylist()
            hint = f"methods scored for it: {', '.join(methods)}" if methods else "it has no scores"
            filters = "".join(f", {k}={v}" for k, v in (("damping", args.damping), ("model", args.model)) if v is not None)
            print(f"no {args.method} scores for query {args.query_id!r}{filters}; {hint}", file=sys.stderr)
            return 1
    if args.format == "table" and query:
        print(f"query {args.query_id}: {query[0]['prompt']!r} -> {query[0]['completion']!r}")
    print(_render(top, args.format, args.max_width))
    return 0


def register_top(subparsers: Any) -> None:
    p = subparsers.add_parser("top", parents=[lake_option()], help="most influential chunks for a query")
    p.add_argument("query_id")
    p.add_argument("--method", default="ms-if", help="ms-if, ss-if, gdp, repsim, bm25 (default ms-if)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--damping", type=float, default=None, help="only this damping value")
    p.add_argument("--model", default=None, help="fine-tuned model hash (default: most recently scored)")
    _output_options(p)
    p.set_defaults(handler=_cmd_top)


def _cmd_status(args: argparse.Namespace) -> int:
    from msif_assets.lake.status import lake_status

    root = lake_root(args)
    rows = lake_status(root)
    table = pa.table({
        "table": [r.name for r in rows],
        "rows": pa.array([r.rows for r in rows], pa.int64()),
        "n_partitions": pa.array([len(r.partitions) for r in rows], pa.int64()),
        "partitions": [", ".join(r.partitions) for r in rows],
    })
    if args.format == "table":
        print(f"lake: {Path(root).resolve()}")
    print(_render(table, args.format, args.max_width))
    return 0


def register_status(subparsers: Any) -> None:
    p = subparsers.add_parser("status", parents=[lake_option()], help="tables, row counts and partitions")
    _output_options(p)
    p.set_defaults(handler=_cmd_status)


COMMANDS: list[Register] = [register_sql, register_top, register_status]


def _plugin_registers() -> list[Register]:
    found = []
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        register = getattr(module, "register", None)
        if register is not None:
            found.append(register)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msif", description="Multi-stage influence data lake.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in [*COMMANDS, *_plugin_registers()]:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Dagster flags the APIs we use (observable source assets, …) as beta at definition time;
    # one warning per definition is noise on a command line, not something a user can act on.
    warnings.filterwarnings("ignore", message=r".*is currently in beta")
    args = build_parser().parse_args(argv)
    from msif_assets.lake.catalog import CatalogError, CatalogQueryError

    try:
        return int(args.handler(args) or 0)
    except (CatalogError, CatalogQueryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
