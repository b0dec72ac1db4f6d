"""``msif``: the command line.

    msif demo | materialize | refresh [--config msif.toml] [--lake DIR]   run the lineage (lineage.py)
    msif sql "<query>" [--lake DIR] [--format table|csv|json] [--timeout S] [--memory-limit SIZE]
    msif queries [--lake DIR] [--format table|csv|json]
    msif top <query_id> [--method ms-if] [--damping rel:0.1] [--all] [--k 10] [--model FT_HASH] [--timeout S] [--memory-limit SIZE]
    msif status
    msif materialize --executor celery [--broker URL]    steps on Celery workers (cluster.py)
    msif worker [--queue dagster --queue gpu] [--name NAME] [--broker URL]

The lake root comes from ``--lake``, else ``$MSIF_LAKE``, else ``./lake``. Each command is a
``register(subparsers)`` function that adds a subparser with ``handler=<fn(args) -> exit code>``;
handlers import heavy libraries inside, so ``msif --help`` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from . import cluster, diff, lineage, validate
from .options import lake_option, lake_root
from .render import output_options, positive_int, render

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
                              description="Views: documents, chunks, queries, query_summary, candidates, influence, "
                              "influence_normalized (share, percentile), influence_with_text, top_k, "
                              "mlp_attn_share, shard_summary, rejects, eval_summary, eval_fidelity, fact_tracing*, "
                              "param_proximity, influence_share.")
    p.add_argument("query", help='e.g. "SELECT * FROM top_k LIMIT 5"')
    _budget_options(p)
    output_options(p)
    p.set_defaults(handler=_cmd_sql)


def _cmd_top(args: argparse.Namespace) -> int:
    from msif_assets.lake.catalog import Catalog

    from . import report

    with Catalog.open(lake_root(args), **_budgets(args)) as catalog:
        try:
            query = report.require_query(catalog, args.query_id)
            ft_model, groups = report.score_groups(catalog, args.query_id, args.model)
            chosen, note = report.select_groups(args.query_id, groups, args.method, args.damping, args.all)
            results = report.top_rows(catalog, args.query_id, ft_model, chosen, args.k)
        except report.ReadingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
    if args.format != "table":
        print(render(_top_table(results), args.format, args.max_width))
        return 0
    print(f"query {args.query_id}: {query['prompt']!r} -> {query['completion']!r}   (fine-tuned model {ft_model})")
    print(note)
    print("share = score / Σ|score| over the group's scored candidates (signed); percentile: 1.0 = rank 1, "
          "0.0 = last; score = raw influence")
    repeated = Counter(g.label for g, _ in results)
    for group, rows in results:
        pt = f", pre-trained model {group.pt_model}" if repeated[group.label] > 1 else ""
        print(f"\n== {group.label}{pt}: top {len(rows)} of {group.n_scored} scored candidates ==")
        print(render(pa.Table.from_pylist(rows).select(report.ROW_COLUMNS), args.format, args.max_width))
    return 0


def _top_table(results: list) -> pa.Table:
    """csv/json: one table, each row labelled with its group (method@damping)."""
    from . import report

    rows = [{"label": g.label, "method": g.method, "damping_kind": g.damping_kind, "damping": g.damping,
             "damping_label": g.damping_text, "pt_model": g.pt_model, "n_scored": g.n_scored,
             **{c: r[c] for c in report.ROW_COLUMNS}}
            for g, group_rows in results for r in group_rows]
    return pa.Table.from_pylist(rows)


def register_top(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "top", parents=[lake_option()], help="most influential chunks for a query",
        description="The k best-ranked chunks of one score group (a method at one damping, labelled "
        "e.g. ms-if@rel:0.1), with share = score / Σ|score| and a rank percentile beside the raw score. "
        "Default: ms-if at its smallest relative damping; --all shows every group, each under its label.")
    p.add_argument("query_id", help="a query id (list them with `msif queries`)")
    p.add_argument("--method", default=None,
                   help="a scored method, e.g. ms-if, ss-if, gdp, repsim, bm25 (default ms-if; with --all: every method)")
    p.add_argument("--k", type=positive_int, default=10, help="rows per group (default 10)")
    p.add_argument("--damping", default=None, metavar="LABEL",
                   help="rel:<alpha> or abs:<lambda> as in msif.toml, e.g. rel:0.1, abs:1e-3 (a bare number is ambiguous)")
    p.add_argument("--all", action="store_true", help="every method and damping scored (or every damping of --method)")
    p.add_argument("--model", default=None, help="fine-tuned model hash (default: most recently scored)")
    _budget_options(p)
    output_options(p)
    p.set_defaults(handler=_cmd_top)


def _cmd_queries(args: argparse.Namespace) -> int:
    from msif_assets.lake.catalog import Catalog

    from . import report

    with Catalog.open(lake_root(args), **_budgets(args)) as catalog:
        table = catalog.query(report.QUERIES_SQL)
    if args.format == "table" and table.num_rows == 0:
        print(f"no queries in the lake at {lake_root(args)}; materialize them "
              "(`msif materialize`, or `msif demo` for the default world)", file=sys.stderr)
    print(render(table, args.format, args.max_width))
    return 0


def register_queries(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "queries", parents=[lake_option()], help="the lake's queries and how many candidates each has scored",
        description="One row per query (view query_summary): query_id, prompt, completion, completion_source "
        "(given | generated), n_candidates, n_scored (chunks with influence scores), n_score_groups "
        "(method@damping rankings). Read one with `msif top <query_id>`.")
    _budget_options(p)
    output_options(p)
    p.set_defaults(handler=_cmd_queries)


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
        print(f"lake: {root}")
    print(render(table, args.format, args.max_width))
    return 0


def register_status(subparsers: Any) -> None:
    p = subparsers.add_parser("status", parents=[lake_option()], help="tables, row counts and partitions")
    output_options(p)
    p.set_defaults(handler=_cmd_status)


def register_cluster(subparsers: Any) -> None:
    """``--executor celery`` on ``materialize``/``refresh`` (lineage.py registers them), and ``msif worker`` (cluster.py)."""
    for name in ("materialize", "refresh"):
        parser = subparsers.choices[name]
        cluster.add_executor_options(parser)
        parser.set_defaults(handler=_executor_handler(parser.get_default("handler")))
    cluster.register_worker(subparsers)


def _executor_handler(in_process: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return cluster.cmd_materialize(args) if cluster.uses_celery(args) else in_process(args)

    return handler


COMMANDS: list[Register] = [lineage.register, register_sql, register_queries, register_top, diff.register, register_status,
                            validate.register, register_cluster]


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
    from msif_assets.lake.storage import LakeStorageError

    from .lake_lock import LakeBusyError

    signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` stops a run like Ctrl-C does
    try:
        return int(args.handler(args) or 0)
    except (CatalogError, CatalogQueryError, ConfigError, LakeBusyError, LakeStorageError) as exc:
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

    from msif_assets.lake.storage import is_remote

    folder = lake_root(args) / ".logs"
    if is_remote(folder):
        folder = Path(tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"msif-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.write_text(traceback.format_exc(), encoding="utf-8")
    return path


if __name__ == "__main__":
    sys.exit(main())
