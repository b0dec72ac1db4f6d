"""``msif diff <ft-a> <ft-b>``: how attribution moved between two fine-tunes (or two checkpoints)
of one pre-trained model, per query and score group (views attribution_diff and
attribution_diff_summary, sql/26_attribution_diff.sql).

A fine-tune is named by its content id (the ``ft_model`` hash that keys the lake's scores), a
unique prefix of it, or its model directory, whose content id is computed the way the pipeline
computes it. For each query it prints the Spearman correlation of the two rankings over the
chunks scored under both, then the chunks that rose and fell most (rank under A, rank under B,
rank change, both scores) and those scored under one model only.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .options import lake_option, lake_root
from .render import output_options, positive_int, render

if TYPE_CHECKING:
    from ..lake.catalog import Catalog
    from .report import ScoreGroup

__all__ = ["register", "FineTune", "resolve_fine_tune", "ROW_COLUMNS"]

ROW_COLUMNS = ["rank_a", "rank_b", "rank_change", "score_a", "score_b", "doc_id", "chunk_id", "shard", "chunk_text"]
_MOVEMENTS = ("rose", "fell", "only_a", "only_b")

_KNOWN_SQL = """
SELECT ft_model, list(DISTINCT pt_model ORDER BY pt_model) AS pt_models, count(DISTINCT query_id) AS n_queries,
       max(computed_at) AS last_scored
FROM influence GROUP BY ft_model ORDER BY max(computed_at), ft_model"""
_SUMMARY_SQL = """
SELECT * FROM attribution_diff_summary WHERE ft_a = $a AND ft_b = $b{where}
ORDER BY query_id, method, damping_kind, damping, pt_model"""
# the k chunks that rose most / fell most / were scored under one model only, per query and group
_ROWS_SQL = """
WITH d AS (
  SELECT *, CASE WHEN presence <> 'both' THEN presence WHEN rank_change > 0 THEN 'rose'
                 WHEN rank_change < 0 THEN 'fell' END AS movement
  FROM attribution_diff WHERE ft_a = $a AND ft_b = $b{where})
SELECT d.*, c.text AS chunk_text, row_number() OVER (
         PARTITION BY query_id, method, damping_kind, damping, pt_model, movement
         ORDER BY CASE movement WHEN 'rose' THEN -rank_change WHEN 'fell' THEN rank_change
                                WHEN 'only_a' THEN rank_a ELSE rank_b END, rank_b, rank_a, d.shard, d.chunk_id) AS pos
FROM d LEFT JOIN chunks AS c ON c.shard = d.shard AND c.chunk_id = d.chunk_id
WHERE movement IS NOT NULL
QUALIFY pos <= $k
ORDER BY query_id, method, damping_kind, damping, pt_model, movement, pos"""


@dataclass(frozen=True)
class FineTune:
    """A fine-tuned model that has scores in the lake."""

    ft_model: str
    pt_models: tuple[str | None, ...]
    n_queries: int
    last_scored: datetime | None

    def describe(self) -> str:
        pts = ", ".join(p or "?" for p in self.pt_models)
        when = f", last scored {self.last_scored.isoformat(timespec='seconds')}" if self.last_scored else ""
        return f"{self.ft_model} (pre-trained {pts}; {self.n_queries} quer{'y' if self.n_queries == 1 else 'ies'}{when})"


def _report():  # report imports the catalog (duckdb); loaded only when a command runs
    from . import report

    return report


class AmbiguousFineTuneError(ValueError):
    """A fine-tune name that matches several models, or names A and B the same (exit code 2)."""

    exit_code = 2


def known_fine_tunes(catalog: Catalog) -> list[FineTune]:
    """Every fine-tuned model with scores in the lake, least recently scored first."""
    return [FineTune(r["ft_model"], tuple(r["pt_models"]), r["n_queries"], r["last_scored"])
            for r in catalog.query(_KNOWN_SQL).to_pylist()]


def _listing(known: list[FineTune]) -> str:
    return "fine-tuned models scored in the lake: " + "; ".join(f.describe() for f in known)


def resolve_fine_tune(text: str, known: list[FineTune], lake: Path) -> FineTune:
    """The fine-tune ``text`` names: its ft_model hash, a unique prefix of it, or a model directory
    (identified by content, as the pipeline does). Raises ReadingError (unknown) or
    AmbiguousFineTuneError (several match), each listing the fine-tunes the lake holds."""
    report = _report()
    if not known:
        raise report.ReadingError(f"the lake at {lake} has no influence scores yet; materialize them "
                                  "(`msif materialize`) for each fine-tune you want to compare")
    by_hash = {f.ft_model: f for f in known}
    if text in by_hash:
        return by_hash[text]
    folder = Path(text).expanduser()
    if folder.is_dir():
        from ..lake.models import ModelDirError, fingerprint_model_dir

        try:
            content_id = fingerprint_model_dir(folder)[:16]
        except ModelDirError as exc:
            raise report.ReadingError(f"{text} is a directory but not a model directory the lake can identify: "
                                      f"{exc}; {_listing(known)}") from None
        if content_id in by_hash:
            return by_hash[content_id]
        raise report.ReadingError(f"model directory {text} has content id {content_id}, which has no scores in the "
                                  f"lake (materialize with it as inputs.finetuned_model); {_listing(known)}")
    matches = [f for f in known if text and f.ft_model.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AmbiguousFineTuneError(f"{text!r} is a prefix of {len(matches)} fine-tuned models "
                                     f"({', '.join(f.ft_model for f in matches)}); give more of the hash. "
                                     f"{_listing(known)}")
    raise report.ReadingError(f"no fine-tuned model {text!r} in the lake (give its hash, a unique prefix of it, or "
                              f"its model directory); {_listing(known)}")


def _pick_groups(summary: list[dict], method: str | None, damping: str | None, every: bool,
                 single_query: bool) -> tuple[dict[str, list[ScoreGroup]], str, list[str]]:
    """Per query, the score groups to show (report.select_groups, as `msif top` picks them);
    the first query's note; and one line per query skipped because it lacks the asked group."""
    report = _report()
    by_query: dict[str, list[ScoreGroup]] = defaultdict(list)
    for r in summary:
        by_query[r["query_id"]].append(report.ScoreGroup(r["method"], r["damping_kind"], r["damping"],
                                                         r["pt_model"], r["n_common"]))
    chosen: dict[str, list[ScoreGroup]] = {}
    notes: list[str] = []
    skipped: list[tuple[str, Exception]] = []
    for query_id, groups in by_query.items():
        try:
            picked, note = report.select_groups(query_id, sorted(groups, key=report.ScoreGroup.sort_key),
                                                method, damping, every)
        except report.ReadingError as exc:
            if single_query:
                raise
            skipped.append((query_id, exc))
            continue
        chosen[query_id] = picked
        notes.append(note)
    if not chosen:
        raise skipped[0][1]
    return chosen, notes[0], [f"skipped query {q}: {exc}" for q, exc in skipped]


def _spearman_text(s: dict) -> str:
    value = s["spearman"]
    shown = f"{value:.3f}" if value is not None else "n/a (under 2 shared chunks, or one ranking all tied)"
    return (f"spearman {shown} over {s['n_common']} chunks scored under both "
            f"(only under A: {s['n_only_a']}, only under B: {s['n_only_b']})")


def _cmd_diff(args: argparse.Namespace) -> int:
    from msif_assets.lake.catalog import Catalog

    report = _report()
    lake = lake_root(args)
    with Catalog.open(lake, timeout_s=args.timeout, memory_limit=args.memory_limit) as catalog:
        try:
            known = known_fine_tunes(catalog)
            ft_a = resolve_fine_tune(args.ft_a, known, lake)
            ft_b = resolve_fine_tune(args.ft_b, known, lake)
            if ft_a.ft_model == ft_b.ft_model:
                raise AmbiguousFineTuneError(f"{args.ft_a!r} and {args.ft_b!r} both name {ft_a.ft_model}; "
                                             f"give two different fine-tunes. {_listing(known)}")
            shared_pt = set(ft_a.pt_models) & set(ft_b.pt_models)
            if not shared_pt:
                raise report.ReadingError(
                    f"{ft_a.ft_model} and {ft_b.ft_model} are fine-tunes of different pre-trained models "
                    f"({', '.join(map(str, ft_a.pt_models))} vs {', '.join(map(str, ft_b.pt_models))}); "
                    "msif diff compares fine-tunes of one pre-trained model")
            params: dict[str, Any] = {"a": ft_a.ft_model, "b": ft_b.ft_model}
            where = ""
            if args.query is not None:
                report.require_query(catalog, args.query)
                params["q"], where = args.query, " AND query_id = $q"
            summary = catalog.query(_SUMMARY_SQL.format(where=where), params).to_pylist()
            if not summary:
                scope = f"query {args.query!r} has no" if args.query is not None else "no query has"
                raise report.ReadingError(
                    f"{scope} scores under both {ft_a.ft_model} and {ft_b.ft_model} for one pre-trained "
                    f"model, method and damping: {ft_a.describe()}; {ft_b.describe()}. Materialize the "
                    "queries under each fine-tune to compare them")
            chosen, note, skipped = _pick_groups(summary, args.method, args.damping, args.all, args.query is not None)
            rows = catalog.query(_ROWS_SQL.format(where=where), {**params, "k": args.k}).to_pylist()
            queries = {r["query_id"]: r for r in catalog.query(
                "SELECT query_id, prompt, completion, completion_source FROM query_summary").to_pylist()}
        except report.ReadingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except AmbiguousFineTuneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
    stats = {(s["query_id"], s["method"], s["damping_kind"], s["damping"], s["pt_model"]): s for s in summary}
    found: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        found[(r["query_id"], r["method"], r["damping_kind"], r["damping"], r["pt_model"], r["movement"])].append(r)
    if args.format != "table":
        print(render(_flat_table(chosen, stats, found, ft_a, ft_b), args.format, args.max_width))
        return 0
    print(f"A = {ft_a.describe()}\nB = {ft_b.describe()}")
    print(note)
    print("rank change = rank under A - rank under B (positive: ranked higher under B); ranks over every chunk "
          "each model scored. spearman: over the chunks scored under both (ranks re-taken within them); chunks "
          "scored under one model only are left out of it and listed apart")
    for line in skipped:
        print(line)
    for query_id, groups in chosen.items():
        q = queries.get(query_id, {})
        print(f"\n#### query {query_id}: {q.get('prompt')!r} -> {q.get('completion')!r}")
        if q.get("completion_source") == "generated":
            print("note: this completion was generated by a fine-tuned model; the lake keeps one completion per "
                  "query (the last materialized), so each fine-tune's scores may attribute its own answer")
        repeated = len({g.label for g in groups}) < len(groups)
        for g in groups:
            s = stats[(query_id, *g.key)]
            pt = f", pre-trained model {g.pt_model}" if repeated else ""
            print(f"\n== {g.label}{pt}: {_spearman_text(s)} ==")
            for movement, title, total in (("rose", "rose under B", s["n_rose"]), ("fell", "fell under B", s["n_fell"]),
                                           ("only_a", "scored only under A", s["n_only_a"]),
                                           ("only_b", "scored only under B", s["n_only_b"])):
                part = found.get((query_id, *g.key, movement), [])
                if not part:
                    if not movement.startswith("only"):
                        print(f"-- {title}: none --")
                    continue
                print(f"-- {title}: {f'all {total}' if len(part) == total else f'top {len(part)} of {total}'} --")
                print(render(pa.Table.from_pylist(part).select(ROW_COLUMNS), args.format, args.max_width))
    return 0


def _flat_table(chosen: dict[str, list[ScoreGroup]], stats: dict[tuple, dict], found: dict[tuple, list[dict]],
                ft_a: FineTune, ft_b: FineTune) -> pa.Table:
    """csv/json: one row per listed chunk, labelled with its query, group and movement, with the
    group's spearman and counts (a group with nothing listed is one row with empty chunk columns)."""
    out: list[dict] = []
    for query_id, groups in chosen.items():
        for g in groups:
            s = stats[(query_id, *g.key)]
            head = {"query_id": query_id, "label": g.label, "method": g.method, "damping_kind": g.damping_kind,
                    "damping": g.damping, "damping_label": g.damping_text, "pt_model": g.pt_model,
                    "ft_a": ft_a.ft_model, "ft_b": ft_b.ft_model, "spearman": s["spearman"],
                    "n_common": s["n_common"], "n_only_a": s["n_only_a"], "n_only_b": s["n_only_b"]}
            listed = [r for m in _MOVEMENTS for r in found.get((query_id, *g.key, m), [])]
            for r in listed or [dict.fromkeys(["movement", "percentile_a", "percentile_b", *ROW_COLUMNS])]:
                out.append({**head, "movement": r["movement"], **{c: r[c] for c in ROW_COLUMNS},
                            "percentile_a": r["percentile_a"], "percentile_b": r["percentile_b"]})
    return pa.Table.from_pylist(out)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "diff", parents=[lake_option()], help="how attribution moved between two fine-tunes of one pre-trained model",
        description="Compare the influence rankings of two fine-tuned models (or two checkpoints) of one pre-trained "
        "model on the queries both scored: per query and score group (method@damping, chosen as `msif top` "
        "chooses), the Spearman correlation over the chunks scored under both, the k chunks that rose and fell "
        "most from A to B, and those scored under one model only. SQL: views attribution_diff, "
        "attribution_diff_summary.")
    p.add_argument("ft_a", help="fine-tune A: its ft_model hash, a unique prefix, or its model directory")
    p.add_argument("ft_b", help="fine-tune B (same forms)")
    p.add_argument("--query", default=None, help="one query id (default: every query scored under both)")
    p.add_argument("--method", default=None, help="a scored method, e.g. ms-if, ss-if, gdp (default ms-if)")
    p.add_argument("--damping", default=None, metavar="LABEL", help="rel:<alpha> or abs:<lambda>, e.g. rel:0.1")
    p.add_argument("--all", action="store_true", help="every method and damping (or every damping of --method)")
    p.add_argument("--k", type=positive_int, default=5, help="chunks listed per movement and group (default 5)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop a query after S seconds (default: $MSIF_SQL_TIMEOUT or 300; 0 = no limit)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="DuckDB memory budget, e.g. 8GB (default: $MSIF_SQL_MEMORY_LIMIT or 4GB)")
    output_options(p)
    p.set_defaults(handler=_cmd_diff)
