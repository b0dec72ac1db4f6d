"""The paper's analyses (METHOD.md, "Analyses") as plain functions over lake tables.

Tables (``eval/<name>.parquet``; ``computed_at`` is timestamp[us, UTC] everywhere):

fact_tracing_full, fact_tracing_rerank   schema tables.FACT_TRACING_FULL, one row per
    (gold-labelled query, method, damping): n_candidates (documents ranked), n_gold (|gold|),
    first_gold_rank? (1-based, null = no gold ranked), reciprocal_rank, recall_any_at_10,
    recall_frac_at_10. ``full`` ranks every eligible document, ``rerank`` its rerank pool.
eval_summary   schema tables.EVAL_SUMMARY: means over queries per method/damping; the metric
    name carries the protocol: ``<full|rerank>/<mrr|recall_any_at_10|recall_frac_at_10|
    mean_candidates>`` (view ``fact_tracing``: one row per protocol, method and damping).
fact_tracing_pools   tables.FACT_TRACING_POOLS: per query, the rerank pool's composition.
(Proximity and MLP/attention shares: ``model_analysis.py``; fidelity: ``fidelity_eval.py``.)

Definitions used for fact tracing:

* A document's score is the **max over its chunks** (a document is as influential as its most
  influential passage; a sum favours long documents, a mean dilutes one relevant passage).
  Documents are identified by ``doc_id`` (gold labels name doc ids), across shards.
* Eligible documents of a query: those scored for it under *every* (method, damping), so
  all methods rank the same set. Gold documents that are not eligible count as misses.
* Rerank pool (Akyürek et al.), drawn from the eligible documents: gold ∪ the ``bm25_k``
  non-gold documents with the highest positive BM25 score (index over every corpus
  document, query = prompt + completion) ∪ ``same_answer_k`` random non-gold documents with
  the same answer ∪ ``random_k`` random documents; each part is drawn from documents not yet
  in the pool, so |pool| ≤ |gold| + bm25_k + same_answer_k + random_k. A document has the
  *same answer* when the query's completion (stripped, case-insensitive) occurs in its text
  as a whole word sequence. Draws are seeded by ``(seed, query_id)``.
"""

from __future__ import annotations

import base64
import datetime as dt
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa

from ..engine.baselines import BM25Index
from ..engine.metrics import rank_by_score, recall_at_k_any, recall_at_k_fraction, reciprocal_rank
from ..lake import tables
from ..lake.atomic import atomic_write
from ..lake.layout import LakeLayout
from ..lake.storage import as_lake_path
from .models import ModelIds
from .queries import query_texts
from .settings import ScoreKey

PROTOCOLS = ("full", "rerank")
RANKING_TABLES = {p: f"fact_tracing_{p}" for p in PROTOCOLS}
SUMMARY_METRICS = {"mrr": "reciprocal_rank", "recall_any_at_10": "recall_any_at_10",
                   "recall_frac_at_10": "recall_frac_at_10", "mean_candidates": "n_candidates"}  # metric: mean of column
K = 10

def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ------------------------------------------------------------------ fact tracing


def document_scores(chunk_scores: pa.Table) -> pa.Table:
    """(query_id, doc_id, method, damping_kind, damping, score): max ``score`` over chunks."""
    keys = ["query_id", "doc_id", "method", "damping_kind", "damping"]
    out = chunk_scores.select([*keys, "score"]).group_by(keys).aggregate([("score", "max")])
    return out.rename_columns([*keys, "score"]).sort_by([(k, "ascending") for k in keys])


def score_lookup(doc_scores: pa.Table) -> tuple[dict[str, dict[ScoreKey, dict[str, float]]], list[ScoreKey]]:
    """``{query_id: {score key: {doc_id: score}}}`` and the score keys present."""
    lookup: dict[str, dict[ScoreKey, dict[str, float]]] = {}
    cols = [doc_scores.column(c).to_pylist() for c in ("query_id", "doc_id", "method", "damping_kind", "damping", "score")]
    keys: dict[tuple, ScoreKey] = {}
    for qid, doc, method, kind, damping, score in zip(*cols):
        key = keys.get((method, kind, damping)) or keys.setdefault((method, kind, damping), ScoreKey.from_columns(method, kind, damping))
        lookup.setdefault(qid, {}).setdefault(key, {})[doc] = score
    return lookup, sorted(set(keys.values()), key=lambda k: k.order)


@dataclass(frozen=True)
class RerankConfig:
    """Sizes of the rerank pool's parts (Akyürek et al.: 100 each) and the draw seed."""

    bm25_k: int = 100
    same_answer_k: int = 100
    random_k: int = 100
    seed: int = 0
    stopwords: str | None = "en"


@dataclass(frozen=True)
class Pool:
    """A query's rerank pool by part (each part sorted; parts are disjoint)."""

    query_id: str
    gold: tuple[str, ...]
    bm25: tuple[str, ...]
    same_answer: tuple[str, ...]
    random: tuple[str, ...]
    n_eligible: int

    @property
    def members(self) -> set[str]:
        return {*self.gold, *self.bm25, *self.same_answer, *self.random}


def contains_answer(text: str, answer: str | None) -> bool:
    """The stripped answer occurs in ``text`` as a whole-word sequence, ignoring case."""
    answer = (answer or "").strip()
    if not answer:
        return False
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.IGNORECASE) is not None


def rerank_pool(query_id: str, text: str, answer: str | None, gold: set[str], eligible: Iterable[str],
                doc_texts: Mapping[str, str], index: BM25Index | None, config: RerankConfig = RerankConfig()) -> Pool:
    """The rerank pool of one query (definition in the module docstring)."""
    eligible = sorted(set(eligible))
    pool_gold = [d for d in eligible if d in gold]
    taken = set(pool_gold)
    bm25: list[str] = []
    if index is not None and config.bm25_k:
        try:
            scores = dict(zip(index.ids, index.scores(text)))
        except ValueError:  # the query has no BM25 tokens: no lexical neighbours
            scores = {}
        hits = [d for d in eligible if d not in taken and scores.get(d, 0.0) > 0.0]
        bm25 = rank_by_score(hits, [scores[d] for d in hits])[: config.bm25_k] if hits else []
        taken |= set(bm25)
    rng = random.Random(f"{config.seed}:{query_id}")
    same = [d for d in eligible if d not in taken and contains_answer(doc_texts.get(d, ""), answer)]
    same = sorted(rng.sample(same, min(config.same_answer_k, len(same))))
    taken |= set(same)
    rest = [d for d in eligible if d not in taken]
    rand = sorted(rng.sample(rest, min(config.random_k, len(rest))))
    return Pool(query_id, tuple(pool_gold), tuple(sorted(bm25)), tuple(same), tuple(rand), len(eligible))


def rank_metrics(scores: Mapping[str, float], members: Iterable[str], gold: set[str], k: int = K) -> dict:
    """Rank ``members`` by ``scores`` (ties by doc id) and measure the gold documents."""
    ids = sorted(d for d in members if d in scores)
    ranked = rank_by_score(ids, [scores[d] for d in ids]) if ids else []
    first = next((i for i, d in enumerate(ranked, 1) if d in gold), None)
    return {"n_candidates": len(ranked), "n_gold": len(gold), "first_gold_rank": first,
            "reciprocal_rank": reciprocal_rank(ranked, gold), "recall_any_at_10": recall_at_k_any(ranked, gold, k),
            "recall_frac_at_10": recall_at_k_fraction(ranked, gold, k)}


def gold_queries(queries: pa.Table) -> list[dict]:
    """Queries with at least one gold document: query_id, text (prompt + completion), answer, gold."""
    texts = query_texts(queries)
    return [{"query_id": r["query_id"], "text": t, "answer": r["completion"], "gold": set(r["gold_doc_ids"])}
            for r, t in zip(queries.select(["query_id", "completion", "gold_doc_ids"]).to_pylist(), texts) if r["gold_doc_ids"]]


@dataclass
class FactTracing:
    """Per-query rows per protocol (FACT_TRACING_FULL / _RERANK), means (EVAL_SUMMARY) and pools."""

    rankings: dict[str, pa.Table]
    summary: pa.Table
    pools: pa.Table

    @classmethod
    def empty(cls) -> "FactTracing":
        return cls({p: tables.FACT_TRACING_FULL.schema.empty_table() for p in PROTOCOLS},
                   tables.EVAL_SUMMARY.schema.empty_table(), tables.FACT_TRACING_POOLS.schema.empty_table())


def write_fact_tracing(layout: LakeLayout, result: FactTracing) -> list[Path]:
    """Replace the per-protocol rankings, the pools and ``eval_summary``."""
    paths = [tables.write_eval(layout, RANKING_TABLES[p], t) for p, t in result.rankings.items()]
    paths.append(tables.write_eval(layout, tables.FACT_TRACING_POOLS.name, result.pools))
    return paths + [tables.write_eval(layout, "eval_summary", result.summary)]


def fact_tracing(doc_scores: pa.Table, queries: pa.Table, doc_texts: Mapping[str, str], ft_model: str,
                 config: RerankConfig = RerankConfig(), computed_at: dt.datetime | None = None) -> FactTracing:
    """MRR and Recall@10 (both definitions) of every method and damping under both protocols."""
    now = computed_at or now_utc()
    lookup, keys = score_lookup(doc_scores)
    ids = sorted(doc_texts)
    index = BM25Index.build([doc_texts[d] for d in ids], ids, stopwords=config.stopwords) if ids else None
    rows: dict[str, list[dict]] = {p: [] for p in PROTOCOLS}
    pools = []
    for q in gold_queries(queries):
        by_key = lookup.get(q["query_id"], {})
        eligible = set.intersection(*(set(by_key.get(k, {})) for k in keys)) if keys else set()
        pool = rerank_pool(q["query_id"], q["text"], q["answer"], q["gold"], eligible, doc_texts, index, config)
        pools.append({"query_id": q["query_id"], "n_gold": len(q["gold"]), "n_gold_in_pool": len(pool.gold),
                      "n_bm25": len(pool.bm25), "n_same_answer": len(pool.same_answer), "n_random": len(pool.random),
                      "n_pool": len(pool.members), "n_eligible": pool.n_eligible, "seed": config.seed,
                      "ft_model": ft_model, "computed_at": now})
        for key in keys:
            base = {"query_id": q["query_id"], **key.columns, "ft_model": ft_model, "computed_at": now}
            scores = by_key.get(key, {})
            for protocol, members in (("full", eligible), ("rerank", pool.members)):
                rows[protocol].append({**base, **rank_metrics(scores, members, q["gold"])})
    rankings = {p: pa.Table.from_pylist(rows[p], schema=tables.FACT_TRACING_FULL.schema) for p in PROTOCOLS}
    pool_table = pa.Table.from_pylist(pools, schema=tables.FACT_TRACING_POOLS.schema)
    return FactTracing(rankings, summarize(rankings, ft_model, now), pool_table)


def summarize(rankings: Mapping[str, pa.Table], ft_model: str, computed_at: dt.datetime) -> pa.Table:
    """EVAL_SUMMARY rows: per protocol, method and damping the mean of each metric over queries."""
    out = []
    for protocol, table in rankings.items():
        groups: dict[ScoreKey, list[dict]] = {}
        for r in table.to_pylist():
            groups.setdefault(ScoreKey.from_columns(r["method"], r["damping_kind"], r["damping"]), []).append(r)
        for key, group in sorted(groups.items(), key=lambda kv: kv[0].order):
            for metric, column in SUMMARY_METRICS.items():
                out.append({**key.columns, "metric": f"{protocol}/{metric}",
                            "value": sum(r[column] for r in group) / len(group), "n_queries": len(group),
                            "ft_model": ft_model, "computed_at": computed_at})
    return pa.Table.from_pylist(out, schema=tables.EVAL_SUMMARY.schema)


def summary_markdown(summary: pa.Table) -> str:
    """One row per method/damping; columns protocol × (MRR, R@10 any, R@10 fraction)."""
    cells: dict[ScoreKey, dict[str, float]] = {}
    for r in summary.to_pylist():
        cells.setdefault(ScoreKey.from_columns(r["method"], r["damping_kind"], r["damping"]), {})[r["metric"]] = r["value"]
    cols = [f"{p}/{m}" for p in PROTOCOLS for m in list(SUMMARY_METRICS)[:3]]
    lines = ["| method | damping | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for key, vals in sorted(cells.items(), key=lambda kv: kv[0].order):
        values = " | ".join(f"{vals.get(c, float('nan')):.3f}" for c in cols)
        lines.append(f"| {key.method} | {key.damping_label} | {values} |")
    return "\n".join(lines)


DAMPING_AXES = {  # damping kind → x axis: a relative α and an absolute λ are different quantities
    "absolute": "absolute damping λ",
    "relative": "relative damping α (λ = α·mean Λ per module)",
}


@dataclass(frozen=True)
class PlotSeries:
    """One damped method on one damping axis: points (damping value, metric value, damping label)."""

    method: str
    points: tuple[tuple[float, float, str], ...]


@dataclass(frozen=True)
class PlotPanel:
    """One panel of the fact-tracing figure: a protocol, a metric and one damping kind
    (``None`` when no method is damped); undamped methods are horizontal reference lines."""

    protocol: str
    metric: str
    axis: str | None
    series: tuple[PlotSeries, ...]
    baselines: tuple[tuple[str, float], ...]

    @property
    def title(self) -> str:
        return f"{self.protocol}: {self.metric}" + (f" — {self.axis} damping" if self.axis else "")

    @property
    def xlabel(self) -> str:
        return DAMPING_AXES.get(self.axis, "(no damped method)")


def fact_tracing_plot_data(summary: pa.Table) -> list[PlotPanel]:
    """The panels of :func:`fact_tracing_figure`, row by row: per protocol one row for each
    damping kind present (absolute first), columns MRR / Recall@10 any / fraction. Relative and
    absolute dampings never share an axis."""
    cells: dict[tuple[str, str], dict[ScoreKey, float]] = {}
    for r in summary.to_pylist():
        protocol, _, metric = r["metric"].partition("/")
        cells.setdefault((protocol, metric), {})[ScoreKey.from_columns(r["method"], r["damping_kind"], r["damping"])] = r["value"]
    present = {k.damping.mode for group in cells.values() for k in group if k.damping is not None}
    axes = [kind for kind in DAMPING_AXES if kind in present] or [None]
    panels = []
    for protocol in PROTOCOLS:
        for axis in axes:
            for metric in list(SUMMARY_METRICS)[:3]:
                group = cells.get((protocol, metric), {})
                by_method: dict[str, list[tuple[float, float, str]]] = {}
                for key, value in group.items():
                    if key.damping is not None and key.damping.mode == axis:
                        by_method.setdefault(key.method, []).append((key.damping.value, value, key.damping.label))
                series = tuple(PlotSeries(m, tuple(sorted(pts))) for m, pts in sorted(by_method.items()))
                baselines = tuple(sorted((k.method, v) for k, v in group.items() if k.damping is None))
                panels.append(PlotPanel(protocol, metric, axis, series, baselines))
    return panels


def fact_tracing_figure(summary: pa.Table):
    """A matplotlib Figure of :func:`fact_tracing_plot_data`: x = damping (log) on its own axis
    per kind; relative dampings are squares, each point labelled (``rel:0.1``); undamped methods
    (GDP, RepSim, BM25) are dashed horizontal lines in every panel."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (renders with Agg)

    panels = fact_tracing_plot_data(summary)
    n_rows = len(panels) // 3
    fig = Figure(figsize=(13, 3.5 * n_rows))
    axes = fig.subplots(n_rows, 3, squeeze=False)
    methods = sorted({s.method for p in panels for s in p.series} | {m for p in panels for m, _ in p.baselines})
    color = {m: f"C{n % 10}" for n, m in enumerate(methods)}
    for ax, panel in zip((a for row in axes for a in row), panels):
        for method, value in panel.baselines:
            ax.axhline(value, linestyle="--", linewidth=1, label=method, color=color[method])
        values = sorted({x for s in panel.series for x, _, _ in s.points})
        for s in panel.series:
            xs, ys, labels = zip(*s.points)
            marker = "s" if panel.axis == "relative" else "o"
            ax.plot(xs, ys, marker=marker, label=f"{s.method} ({panel.axis})", color=color[s.method])
            if panel.axis == "relative":
                for x, y, text in s.points:
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color[s.method])
        if values:
            ax.set_xscale("log")
            if panel.axis == "relative":  # few α values: tick each with its label
                ax.set_xticks(values, [f"rel:{v:g}" for v in values])
                ax.minorticks_off()
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylim(-0.02, 1.02)
        if ax is axes[0][0] or (panel.axis == "relative" and panel.metric == "mrr" and panel.protocol == PROTOCOLS[0]):
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_fact_tracing(summary: pa.Table, path: Path) -> Path:
    """PNG of :func:`fact_tracing_figure`."""
    fig = fact_tracing_figure(summary)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))


def png_markdown(path: Path) -> str:
    return f"![fact tracing](data:image/png;base64,{base64.b64encode(as_lake_path(path).read_bytes()).decode()})"


def load_doc_texts(layout: LakeLayout) -> dict[str, str]:
    """``{doc_id: text}`` over every shard (the first shard in name order wins a repeated id)."""
    texts: dict[str, str] = {}
    for shard in tables.list_shards(layout):
        docs = tables.read_docs(layout, shard)
        for doc_id, text in zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()):
            texts.setdefault(doc_id, text)
    return texts


def load_chunk_scores(layout: LakeLayout, ids: ModelIds) -> pa.Table:
    """Every influence row of the current model pair, through the DuckDB catalog."""
    from ..lake.catalog import Catalog

    with Catalog.open(layout.root, timeout_s=0) as catalog:  # a pipeline step, not a user query: no time budget
        return catalog.query(
            "SELECT query_id, doc_id, chunk_id, method, damping_kind, damping, score, score_mlp, score_attn "
            "FROM influence WHERE ft_model = $ft AND pt_model = $pt", {"ft": ids.ft, "pt": ids.pt})


