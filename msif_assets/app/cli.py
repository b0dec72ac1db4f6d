"""``msif``: the command line.

    msif demo | materialize | refresh [--config msif.toml] [--lake DIR]   run the lineage (lineage.py)
    msif sql "<query>" [--lake DIR] [--format table|csv|json] [--timeout S] [--memory-limit SIZE]
    msif top <query_id> [--method ms-if] [--k 10] [--damping X] [--model FT_HASH] [--timeout S] [--memory-limit SIZE]
    msif status

The lake root comes from ``--lake``, else ``$MSIF_LAKE``, else ``./lake``. Each command is a
``register(subparsers)`` function that adds a subparser with ``handler=<fn(args) -> exit code>``;
handlers import heavy libraries inside, so ``msif --help`` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from . import lineage
from .options import lake_option, lake_root
from .render import output_options, render

__all__ = ["main", "build_parser", "COMMANDS"]

Register = Callable[[Any], None]


# -- commands over the lake ------------------------------------------------------
def _budget_options(p: argparse.ArgumentParser) -> None:
    """``--timeout`` / ``--memory-limit``: the query budgets of the catalog (catalog.py)."""
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop a query after S seconds (default: $MSIF_SQL_TIMEOUT or 300; 0 = no limit)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="DuckDB memory budget, e.g. 8GB (default: $MSIF_SQL_MEMORY_LIMIT or 4GB)")


def _budgets(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout_s": args.timeout, "memory_limit": args.memory_limit}


def _cmd_sql(args: argparse.Namespace) -> int:
    from msif_assets.lake.catalog import Catalog

    with Catalog.open(lake_root(args), **_budgets(args)) as catalog:
        print(render(catalog.query(args.query), args.format, args.max_width))
    return 0


def register_sql(subparsers: Any) -> None:
    p = subparsers.add_parser("sql", parents=[lake_option()], help="run a read-only SQL query on the catalog",
                              description="Views: documents, chunks, queries, candidates, influence, "
                              "influence_with_text, top_k, mlp_attn_share, shard_summary, rejects, eval_*.")
    p.add_argument("query", help='e.g. "SELECT * FROM top_k LIMIT 5"')
    _budget_options(p)
    output_options(p)
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
    with Catalog.open(lake_root(args), **_budgets(args)) as catalog:
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
    print(render(top, args.format, args.max_width))
    return 0


def register_top(subparsers: Any) -> None:
    p = subparsers.add_parser("top", parents=[lake_option()], help="most influential chunks for a query")
    p.add_argument("query_id")
    p.add_argument("--method", default="ms-if", help="a method of the influence table, e.g. ms-if, gdp, bm25 (default ms-if; a miss lists those scored)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--damping", type=float, default=None, help="only this damping value")
    p.add_argument("--model", default=None, help="fine-tuned model hash (default: most recently scored)")
    _budget_options(p)
    output_options(p)
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
    print(render(table, args.format, args.max_width))
    return 0


def register_status(subparsers: Any) -> None:
    p = subparsers.add_parser("status", parents=[lake_option()], help="tables, row counts and partitions")
    output_options(p)
    p.set_defaults(handler=_cmd_status)


COMMANDS: list[Register] = [lineage.register, register_sql, register_top, register_status]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msif", description="Multi-stage influence data lake.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Dagster flags the APIs we use (observable source assets, …) as beta at definition time;
    # one warning per definition is noise on a command line, not something a user can act on.
    warnings.filterwarnings("ignore", message=r".*is currently in beta")
    args = build_parser().parse_args(argv)
    from msif_assets.config import ConfigError
    from msif_assets.lake.catalog import CatalogError, CatalogQueryError

    from .lake_lock import LakeBusyError

    signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` stops a run like Ctrl-C does
    try:
        return int(args.handler(args) or 0)
    except (CatalogError, CatalogQueryError, ConfigError, LakeBusyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msif: interrupted; the next run marks the interrupted run failed and resumes", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the reader, the traceback for the log
        log_file = _write_traceback(args)
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__} (traceback: {log_file})",
              file=sys.stderr)
        return 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _write_traceback(args: argparse.Namespace) -> Path:
    import tempfile
    import time
    import traceback

    folder = lake_root(args) / ".logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"msif-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.write_text(traceback.format_exc(), encoding="utf-8")
    return path


if __name__ == "__main__":
    sys.exit(main())
