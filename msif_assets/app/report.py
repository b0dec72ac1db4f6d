"""What the reading commands print. ``msif demo``: the world, the top influential documents
for a few queries, a SQL example and the fact-tracing table. ``msif top`` / ``msif queries``:
score groups of a query (one method at one damping each, labelled ``ms-if@rel:0.1``) and
the lake's queries, with messages that say what is missing and how to get it."""

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .render import format_table
from ..lake.catalog import Catalog

TOP_SQL = """SELECT rank, doc_id, round(score, 3) AS score, round(score_mlp / nullif(score, 0), 2) AS mlp_share, chunk_text
FROM influence_with_text
WHERE query_id = $q AND method = 'ms-if' AND damping_kind = 'relative'
ORDER BY rank LIMIT 5"""

EXAMPLE_SQL = """SELECT method, damping_kind, damping, round(avg(mlp_share), 3) AS mlp_share,
       round(avg(attn_share), 3) AS attn_share, count(*) AS queries
FROM mlp_attn_share GROUP BY ALL ORDER BY method, damping_kind, damping"""


def _world_metrics(config) -> dict:
    manifest = Path(config.demo_dir) / "build.json"
    if not manifest.is_file():
        return {}
    steps = json.loads(manifest.read_text())["steps"]
    return {k: v for step in steps.values() for k, v in step.get("metrics", {}).items()}


def print_demo_report(config, ran, refreshed, seconds: float, n_queries: int = 3) -> None:
    metrics = _world_metrics(config)
    print("\n=== msif: the embedded default world ===")
    if metrics:
        print(
            f"fine-tuned model answers {metrics.get('heldout_qa_accuracy', float('nan')):.0%} of held-out questions "
            f"(facts seen only in pre-training; pre-trained model alone: {metrics.get('pretrained_heldout_qa_accuracy', float('nan')):.0%}); "
            f"‖θ_ft−θ_pt‖/‖θ_pt‖ = {metrics.get('relative_param_distance', float('nan')):.3f}"
        )
    print(f"lineage: {len(ran.executed) + len(refreshed.executed)} asset partitions in {ran.runs + refreshed.runs} runs, {seconds:.0f}s; lake at {config.lake_root}")
    catalog = Catalog.open(config.lake_root)
    try:
        queries = catalog.query("SELECT query_id, prompt, completion, gold_doc_ids FROM queries ORDER BY query_id LIMIT $n", {"n": n_queries}).to_pylist()
        for q in queries:
            gold = set(q["gold_doc_ids"] or [])
            print(f"\nquery {q['query_id']}: {q['prompt']!r} → {q['completion']!r}   (gold: {', '.join(sorted(gold)) or 'n/a'})")
            top = catalog.query(TOP_SQL, {"q": q["query_id"]})
            rows = top.to_pylist()
            for r in rows:
                mark = "★" if r["doc_id"] in gold else " "
                text = (r["chunk_text"] or "").replace("\n", " ")
                print(f"  {mark} #{r['rank']:<2} {r['doc_id']:<14} {r['score']:>10.3f}  {text[:90]}")
        print("\nSQL (msif sql \"…\"):\n" + EXAMPLE_SQL)
        print(format_table(catalog.query(EXAMPLE_SQL)))
        _print_fact_tracing(catalog)
    finally:
        catalog.close()
    print("\nExplore: `make ui` (Dagster UI), `.venv/bin/msif queries`, `.venv/bin/msif top <query_id> [--all]`, "
          "`.venv/bin/msif sql \"SELECT * FROM top_k LIMIT 20\"`.")


def _print_fact_tracing(catalog: Catalog) -> None:
    views = {r["view_name"] for r in catalog.query("SELECT view_name FROM duckdb_views() WHERE NOT internal").to_pylist()}
    if "fact_tracing" not in views:
        return
    table = catalog.query(
        "SELECT * FROM fact_tracing ORDER BY protocol, method, damping_kind, damping"
    )
    if table.num_rows:
        print("\nFact tracing (MRR, Recall@10 any / fraction of gold) — ★ = gold source document:")
        print(format_table(table))


# -- msif top / msif queries ---------------------------------------------------------
DEFAULT_METHOD = "ms-if"
QUERIES_SQL = "SELECT * FROM query_summary ORDER BY query_id"
_GROUPS_SQL = """
SELECT method, damping_kind, damping, pt_model, ft_model, max(computed_at) AS computed_at, count(*) AS n_scored
FROM influence WHERE query_id = $q GROUP BY ALL"""
_TOP_SQL = """
SELECT method, damping_kind, damping, pt_model, rank, share, percentile, score, score_mlp, score_attn,
       doc_id, chunk_id, shard, chunk_text
FROM influence_with_text
WHERE query_id = $q AND ft_model = $ft AND rank <= $k
ORDER BY method, damping_kind, damping, pt_model, rank"""
ROW_COLUMNS = ["rank", "share", "percentile", "score", "score_mlp", "score_attn", "doc_id", "chunk_id", "shard",
               "chunk_text"]


class ReadingError(ValueError):
    """A reading command asked for something the lake does not hold (exit code 1), or asked
    ambiguously (exit code 2)."""

    exit_code = 1


class DampingSyntaxError(ReadingError):
    """``--damping`` is not a label such as ``rel:0.1`` / ``abs:0.001`` (a bare number is ambiguous)."""

    exit_code = 2


def damping_label(kind: str | None, value: float | None) -> str | None:
    """``rel:0.1`` / ``abs:0.001`` as ``Damping.label`` writes it; None for undamped methods."""
    if kind is None or value is None:
        return None
    from ..engine.precondition import Damping

    return Damping(kind, value).label


@dataclass(frozen=True)
class ScoreGroup:
    """One ranking of a query's candidates: a method at one damping, for one model pair."""

    method: str
    damping_kind: str | None
    damping: float | None
    pt_model: str | None
    n_scored: int

    @property
    def damping_text(self) -> str | None:
        return damping_label(self.damping_kind, self.damping)

    @property
    def label(self) -> str:
        return f"{self.method}@{self.damping_text}" if self.damping_text else self.method

    @property
    def key(self) -> tuple:
        return (self.method, self.damping_kind, self.damping, self.pt_model)

    def sort_key(self) -> tuple:
        """Methods in configuration order (ms-if first), then relative dampings, then the smallest."""
        from ..pipeline.settings import ALL_METHODS

        order = ALL_METHODS.index(self.method) if self.method in ALL_METHODS else len(ALL_METHODS)
        return (order, self.method, self.damping_kind != "relative", self.damping_kind or "", self.damping or 0.0,
                self.pt_model or "")


def require_query(catalog: Catalog, query_id: str) -> dict:
    """The query's row, or ReadingError saying the lake has no such query and how to list them."""
    rows = catalog.query("SELECT query_id, prompt, completion FROM queries WHERE query_id = $q",
                         {"q": query_id}).to_pylist()
    if rows:
        return rows[0]
    ids = catalog.query("SELECT query_id FROM queries ORDER BY query_id").column("query_id").to_pylist()
    if not ids:
        raise ReadingError(f"no such query {query_id!r}: the lake at {catalog.lake_root} has no queries yet; "
                           "materialize them (`msif materialize`, or `msif demo` for the default world)")
    close = difflib.get_close_matches(query_id, ids, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ReadingError(f"no such query {query_id!r} ({len(ids)} quer{'y' if len(ids) == 1 else 'ies'} in the lake; "
                       f"e.g. {', '.join(ids[:3])}{'…' if len(ids) > 3 else ''}; list them with `msif queries`){hint}")


def score_groups(catalog: Catalog, query_id: str, model: str | None) -> tuple[str, list[ScoreGroup]]:
    """The fine-tuned model to read (``model``, else the most recently scored) and its groups."""
    rows = catalog.query(_GROUPS_SQL, {"q": query_id}).to_pylist()
    if not rows:
        raise ReadingError(f"query {query_id!r} exists but has no scores yet; materialize influence_scores "
                           "(`msif materialize`) and try again")
    models = sorted({r["ft_model"] for r in rows})
    if model is None:
        model = max(rows, key=lambda r: r["computed_at"])["ft_model"]
    elif model not in models:
        raise ReadingError(f"no scores for query {query_id!r} with --model {model}; "
                           f"fine-tuned models scored for it: {', '.join(models)}")
    groups = [ScoreGroup(r["method"], r["damping_kind"], r["damping"], r["pt_model"], r["n_scored"])
              for r in rows if r["ft_model"] == model]
    return model, sorted(groups, key=ScoreGroup.sort_key)


def _labels(groups: list[ScoreGroup]) -> str:
    return ", ".join(dict.fromkeys(g.label for g in groups))


def _match_damping(text: str, query_id: str, candidates: list[ScoreGroup], scope: str) -> list[ScoreGroup]:
    from ..engine.precondition import Damping

    present = f"dampings scored for {scope}: {', '.join(dict.fromkeys(g.damping_text for g in candidates)) or 'none'}"
    try:
        float(text)
    except ValueError:
        pass
    else:
        raise DampingSyntaxError(f"--damping {text} is ambiguous: write rel:{text} (relative) or abs:{text} "
                                 f"(absolute); {present}")
    try:
        wanted = Damping.parse(text)
    except ValueError as exc:
        raise DampingSyntaxError(f"--damping: {exc}; {present}") from None
    hits = [g for g in candidates if g.damping_kind == wanted.mode
            and math.isclose(g.damping, wanted.value, rel_tol=1e-9, abs_tol=0.0)]
    if not hits:
        raise ReadingError(f"no {scope} scores at damping {wanted.label} for query {query_id!r}; {present}")
    return hits


def select_groups(query_id: str, groups: list[ScoreGroup], method: str | None, damping: str | None,
                  every: bool) -> tuple[list[ScoreGroup], str]:
    """The groups ``msif top`` shows, and a line saying which and why (how to choose others)."""
    methods = list(dict.fromkeys(g.method for g in groups))
    if method is not None and method not in methods:
        raise ReadingError(f"no {method} scores for query {query_id!r}; methods scored for it: {', '.join(methods)}")
    if method is None and not every:
        method = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    chosen = [g for g in groups if method is None or g.method == method]
    if damping is not None:
        damped = [g for g in chosen if g.damping_kind is not None]
        if not damped:
            raise ReadingError(f"{method or 'the scored methods'}: no damping to choose (only MS-IF and SS-IF "
                               f"scores are damped); drop --damping. Scored for {query_id!r}: {_labels(groups)}")
        picked = _match_damping(damping, query_id, damped, method or "any method")
        return picked, f"showing {_labels(picked)} (--damping {damping})"
    if every:
        return chosen, f"all {len(chosen)} score groups of {method or 'every method'}"
    first = chosen[0]  # sort_key: relative dampings first, then the smallest
    picked = [g for g in chosen if g.key[:3] == first.key[:3]]
    others = [g for g in groups if g.key[:3] != first.key[:3]]
    note = f"showing {first.label}"
    if first.damping_kind is not None:
        note += f" (default: {method} at its smallest relative damping, else its smallest absolute one)"
    if others:
        same = [g for g in others if g.method == first.method and g.damping_text]
        how = (f"--damping {same[0].damping_text}" if same else f"--method {others[0].method}"
               + (f" --damping {others[0].damping_text}" if others[0].damping_text else ""))
        note += (f"; also scored: {_labels(others)}. Choose with --method / --damping (e.g. {how}), "
                 "or show every group with --all")
    return picked, note


def top_rows(catalog: Catalog, query_id: str, ft_model: str, groups: list[ScoreGroup], k: int) -> list[tuple[ScoreGroup, list[dict]]]:
    """The ``k`` best-ranked rows of each group, with share and percentile (influence_normalized)."""
    rows = catalog.query(_TOP_SQL, {"q": query_id, "ft": ft_model, "k": k}).to_pylist()
    by_key: dict[tuple, list[dict]] = {g.key: [] for g in groups}
    for r in rows:
        key = (r["method"], r["damping_kind"], r["damping"], r["pt_model"])
        if key in by_key:
            by_key[key].append(r)
    return [(g, by_key[g.key]) for g in groups]
