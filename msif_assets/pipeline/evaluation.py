"""The paper's analyses (METHOD.md, "Analyses") as plain functions over lake tables.

Tables (``eval/<name>.parquet``; ``computed_at`` is timestamp[us, UTC] everywhere):

fact_tracing_full, fact_tracing_rerank   schema tables.EVAL_RANKING, one row per
    (gold-labelled query, method, damping): n_candidates (documents ranked), n_gold (|gold|),
    first_gold_rank? (1-based, null = no gold ranked), reciprocal_rank, recall_any_at_10,
    recall_frac_at_10. ``full`` ranks every eligible document, ``rerank`` its rerank pool.
eval_summary   schema tables.EVAL_SUMMARY: means over queries per method/damping; the metric
    name carries the protocol: ``<full|rerank>/<mrr|recall_any_at_10|recall_frac_at_10|
    mean_candidates>`` (view ``fact_tracing``: one row per protocol, method and damping).
fact_tracing_pools   FACT_TRACING_POOLS: per query, the rerank pool's composition.
param_proximity      PARAM_PROXIMITY: ‖θ_ft − θ_pt‖₂ / ‖θ_pt‖₂ per weight scope.
influence_share      INFLUENCE_SHARE: |influence| and parameter shares of MLP vs attention.
eval_fidelity        tables.EVAL_FIDELITY: EK-FAC vs exact damped-GGN influence on a small
    GPT-NeoX trained on a synthetic Markov chain (see :class:`FidelityConfig`).

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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from ..engine import document_example, query_example
from ..engine.baselines import BM25Index
from ..engine.fidelity import FidelityRow, fidelity_table
from ..engine.metrics import (
    influence_share, rank_by_score, recall_at_k_any, recall_at_k_fraction, reciprocal_rank, relative_distance,
)
from ..engine.modules import ModuleSpec, weight_matrix
from ..lake import tables
from ..lake.atomic import atomic_write
from ..lake.layout import LakeLayout
from .queries import query_texts

PROTOCOLS = ("full", "rerank")
RANKING_TABLES = {p: f"fact_tracing_{p}" for p in PROTOCOLS}
SUMMARY_METRICS = {"mrr": "reciprocal_rank", "recall_any_at_10": "recall_any_at_10",
                   "recall_frac_at_10": "recall_frac_at_10", "mean_candidates": "n_candidates"}  # metric: mean of column
K = 10
MethodKey = tuple[str, "str | None", "float | None"]  # (method, damping_kind, damping)

_S, _TS = pa.string(), pa.timestamp("us", tz="UTC")
_f = pa.field
FACT_TRACING_POOLS = tables.TableSpec("fact_tracing_pools", pa.schema([
    _f("query_id", _S, False), _f("n_gold", pa.int32(), False), _f("n_gold_in_pool", pa.int32(), False),
    _f("n_bm25", pa.int32(), False), _f("n_same_answer", pa.int32(), False), _f("n_random", pa.int32(), False),
    _f("n_pool", pa.int32(), False), _f("n_eligible", pa.int32(), False), _f("seed", pa.int64(), False),
    _f("ft_model", _S, False), _f("computed_at", _TS, False),
]), key=("query_id", "ft_model"))
PARAM_PROXIMITY = tables.TableSpec("param_proximity", pa.schema([
    _f("scope", _S, False), _f("n_tensors", pa.int32(), False), _f("n_params", pa.int64(), False),
    _f("relative_distance", pa.float64(), False), _f("pt_model", _S, False), _f("ft_model", _S, False),
    _f("computed_at", _TS, False),
]), key=("scope", "pt_model", "ft_model"))
INFLUENCE_SHARE = tables.TableSpec("influence_share", pa.schema([
    _f("method", _S, False), _f("damping_kind", _S, True), _f("damping", pa.float64(), True),
    _f("n_pairs", pa.int64(), False), _f("abs_influence_mlp", pa.float64(), False),
    _f("abs_influence_attn", pa.float64(), False), _f("influence_share_mlp", pa.float64(), False),
    _f("influence_share_attn", pa.float64(), False), _f("param_count_mlp", pa.int64(), False),
    _f("param_count_attn", pa.int64(), False), _f("param_share_mlp", pa.float64(), False),
    _f("param_share_attn", pa.float64(), False), _f("pt_model", _S, False), _f("ft_model", _S, False),
    _f("computed_at", _TS, False),
]), key=("method", "damping_kind", "damping", "pt_model", "ft_model"))


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def write_eval_table(layout: LakeLayout, name: str, spec: tables.TableSpec, table: pa.Table) -> Path:
    """Atomically replace ``eval/<name>.parquet`` with ``table`` conformed to ``spec``."""
    table = tables.conform(table, spec)
    return atomic_write(layout.eval_file(name), lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_eval_table(layout: LakeLayout, name: str, spec: tables.TableSpec) -> pa.Table:
    return tables.conform(pq.read_table(layout.eval_file(name)), spec, fill_missing_nullable=True)


# ------------------------------------------------------------------ fact tracing


def document_scores(chunk_scores: pa.Table) -> pa.Table:
    """(query_id, doc_id, method, damping_kind, damping, score): max ``score`` over chunks."""
    keys = ["query_id", "doc_id", "method", "damping_kind", "damping"]
    out = chunk_scores.select([*keys, "score"]).group_by(keys).aggregate([("score", "max")])
    return out.rename_columns([*keys, "score"]).sort_by([(k, "ascending") for k in keys])


def _key_order(key: MethodKey) -> tuple:
    return key[0], key[1] or "", -1.0 if key[2] is None else key[2]


def score_lookup(doc_scores: pa.Table) -> tuple[dict[str, dict[MethodKey, dict[str, float]]], list[MethodKey]]:
    """``{query_id: {(method, kind, damping): {doc_id: score}}}`` and the method keys present."""
    lookup: dict[str, dict[MethodKey, dict[str, float]]] = {}
    cols = [doc_scores.column(c).to_pylist() for c in ("query_id", "doc_id", "method", "damping_kind", "damping", "score")]
    for qid, doc, method, kind, damping, score in zip(*cols):
        lookup.setdefault(qid, {}).setdefault((method, kind, damping), {})[doc] = score
    keys = sorted({k for by_key in lookup.values() for k in by_key}, key=_key_order)
    return lookup, keys


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
    """Per-query rows per protocol (EVAL_RANKING), means (EVAL_SUMMARY) and pools."""

    rankings: dict[str, pa.Table]
    summary: pa.Table
    pools: pa.Table

    @classmethod
    def empty(cls) -> "FactTracing":
        return cls({p: tables.EVAL_RANKING.schema.empty_table() for p in PROTOCOLS},
                   tables.EVAL_SUMMARY.schema.empty_table(), FACT_TRACING_POOLS.schema.empty_table())


def write_fact_tracing(layout: LakeLayout, result: FactTracing) -> list[Path]:
    """Replace the per-protocol rankings, the pools and ``eval_summary``."""
    paths = [write_eval_table(layout, RANKING_TABLES[p], tables.EVAL_RANKING, t) for p, t in result.rankings.items()]
    paths.append(write_eval_table(layout, FACT_TRACING_POOLS.name, FACT_TRACING_POOLS, result.pools))
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
        for method, kind, damping in keys:
            base = {"query_id": q["query_id"], "method": method, "damping_kind": kind, "damping": damping,
                    "ft_model": ft_model, "computed_at": now}
            scores = by_key.get((method, kind, damping), {})
            for protocol, members in (("full", eligible), ("rerank", pool.members)):
                rows[protocol].append({**base, **rank_metrics(scores, members, q["gold"])})
    rankings = {p: pa.Table.from_pylist(rows[p], schema=tables.EVAL_RANKING.schema) for p in PROTOCOLS}
    pool_table = pa.Table.from_pylist(pools, schema=FACT_TRACING_POOLS.schema)
    return FactTracing(rankings, summarize(rankings, ft_model, now), pool_table)


def summarize(rankings: Mapping[str, pa.Table], ft_model: str, computed_at: dt.datetime) -> pa.Table:
    """EVAL_SUMMARY rows: per protocol, method and damping the mean of each metric over queries."""
    out = []
    for protocol, table in rankings.items():
        groups: dict[MethodKey, list[dict]] = {}
        for r in table.to_pylist():
            groups.setdefault((r["method"], r["damping_kind"], r["damping"]), []).append(r)
        for (method, kind, damping), group in sorted(groups.items(), key=lambda kv: _key_order(kv[0])):
            for metric, column in SUMMARY_METRICS.items():
                out.append({"method": method, "damping": damping, "damping_kind": kind, "metric": f"{protocol}/{metric}",
                            "value": sum(r[column] for r in group) / len(group), "n_queries": len(group),
                            "ft_model": ft_model, "computed_at": computed_at})
    return pa.Table.from_pylist(out, schema=tables.EVAL_SUMMARY.schema)


def damping_label(kind: str | None, damping: float | None) -> str:
    return "—" if damping is None else f"{(kind or '')[:3]}:{damping:g}"


def summary_markdown(summary: pa.Table) -> str:
    """One row per method/damping; columns protocol × (MRR, R@10 any, R@10 fraction)."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in summary.to_pylist():
        cells.setdefault((r["method"], r["damping_kind"], r["damping"]), {})[r["metric"]] = r["value"]
    cols = [f"{p}/{m}" for p in PROTOCOLS for m in list(SUMMARY_METRICS)[:3]]
    lines = ["| method | damping | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (method, kind, damping), vals in sorted(cells.items(), key=lambda kv: _key_order(kv[0])):
        values = " | ".join(f"{vals.get(c, float('nan')):.3f}" for c in cols)
        lines.append(f"| {method} | {damping_label(kind, damping)} | {values} |")
    return "\n".join(lines)


def plot_fact_tracing(summary: pa.Table, path: Path) -> Path:
    """PNG: rows = protocols, columns = MRR / Recall@10 any / fraction, x = damping (log).
    Undamped methods (GDP, RepSim, BM25) are dashed horizontal lines."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (renders with Agg)

    fig = Figure(figsize=(13, 7))
    axes = fig.subplots(len(PROTOCOLS), 3, squeeze=False)
    rows = summary.to_pylist()
    for i, protocol in enumerate(PROTOCOLS):
        for j, metric in enumerate(list(SUMMARY_METRICS)[:3]):
            ax, lines = axes[i][j], {}
            for r in rows:
                if r["metric"] == f"{protocol}/{metric}":
                    lines.setdefault((r["method"], r["damping_kind"]), []).append((r["damping"], r["value"]))
            for n, ((method, kind), points) in enumerate(sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))):
                if points[0][0] is None:
                    ax.axhline(points[0][1], linestyle="--", linewidth=1, label=method, color=f"C{n % 10}")
                else:
                    xs, ys = zip(*sorted(points))
                    ax.plot(xs, ys, marker="o", label=f"{method} ({kind})", color=f"C{n % 10}")
            if any(k[1] for k in lines):
                ax.set_xscale("log")
            ax.set_title(f"{protocol}: {metric}")
            ax.set_xlabel("damping (kind in legend)")
            ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))


def png_markdown(path: Path) -> str:
    return f"![fact tracing](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"


def load_doc_texts(layout: LakeLayout) -> dict[str, str]:
    """``{doc_id: text}`` over every shard (the first shard in name order wins a repeated id)."""
    texts: dict[str, str] = {}
    for shard in tables.list_shards(layout):
        docs = tables.read_docs(layout, shard)
        for doc_id, text in zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()):
            texts.setdefault(doc_id, text)
    return texts


def load_chunk_scores(layout: LakeLayout, pt_model: str, ft_model: str) -> pa.Table:
    """Every influence row of the current model pair, through the DuckDB catalog."""
    from ..lake.catalog import Catalog

    with Catalog.open(layout.root) as catalog:
        return catalog.query(
            "SELECT query_id, doc_id, chunk_id, method, damping_kind, damping, score, score_mlp, score_attn "
            "FROM influence WHERE ft_model = $ft AND pt_model = $pt", {"ft": ft_model, "pt": pt_model})


# --------------------------------------------------------- proximity and shares


@dataclass(frozen=True)
class ProximityRow:
    scope: str  # "tracked", "tracked-mlp", "tracked-attn", "all-shared"
    n_tensors: int
    n_params: int
    relative_distance: float  # ‖θ_ft − θ_pt‖₂ / ‖θ_pt‖₂


def parameter_proximity(pt: nn.Module, ft: nn.Module, specs: Sequence[ModuleSpec]) -> list[ProximityRow]:
    """Relative distance over the tracked ``[W | b]`` (all, per group) and all shared parameters
    (same name and shape, e.g. everything but a replaced head)."""
    pt_mods, ft_mods = dict(pt.named_modules()), dict(ft.named_modules())
    rows = []
    for scope, group in (("tracked", None), ("tracked-mlp", "mlp"), ("tracked-attn", "attn")):
        chosen = [s for s in specs if group in (None, s.group)]
        if chosen:
            a = {s.name: weight_matrix(pt_mods[s.name], s) for s in chosen}
            b = {s.name: weight_matrix(ft_mods[s.name], s) for s in chosen}
            rows.append(ProximityRow(scope, len(chosen), sum(s.numel for s in chosen), relative_distance(a, b)))
    pt_params, ft_params = dict(pt.named_parameters()), dict(ft.named_parameters())
    shared = {k: v for k, v in pt_params.items() if k in ft_params and ft_params[k].shape == v.shape}
    rows.append(ProximityRow("all-shared", len(shared), sum(v.numel() for v in shared.values()),
                             relative_distance(shared, {k: ft_params[k] for k in shared})))
    return rows


def tracked_parameter_counts(specs: Sequence[ModuleSpec]) -> dict[str, int]:
    """Parameters (weights + biases) of the tracked modules per group: ``{"mlp": n, "attn": n}``."""
    return {g: sum(s.numel for s in specs if s.group == g) for g in ("mlp", "attn")}


def influence_shares(chunk_scores: pa.Table, param_counts: Mapping[str, int]) -> list[dict]:
    """Per method and damping, the share of Σ|score_mlp| vs Σ|score_attn| over all scored
    (query, chunk) pairs (group totals per pair: modules within a group may cancel), next to
    the parameter share of the tracked MLP vs attention modules."""
    groups: dict[MethodKey, tuple[list, list]] = {}
    cols = [chunk_scores.column(c).to_pylist() for c in ("method", "damping_kind", "damping", "score_mlp", "score_attn")]
    for method, kind, damping, mlp, attn in zip(*cols):
        if mlp is not None and attn is not None:
            pair = groups.setdefault((method, kind, damping), ([], []))
            pair[0].append(mlp)
            pair[1].append(attn)
    out = []
    for (method, kind, damping), (mlp, attn) in sorted(groups.items(), key=lambda kv: _key_order(kv[0])):
        if not any(mlp) and not any(attn):
            continue
        share = influence_share(mlp, attn, param_counts["mlp"], param_counts["attn"])
        out.append({"method": method, "damping_kind": kind, "damping": damping, "n_pairs": len(mlp), **share,
                    "param_count_mlp": param_counts["mlp"], "param_count_attn": param_counts["attn"]})
    return out


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows])


# -------------------------------------------------------------------- fidelity


@dataclass(frozen=True)
class FidelityConfig:
    """A tiny GPT-NeoX trained on a seeded Markov chain (each token has two successors), then
    EK-FAC fidelity against exact damped-GGN influence over its own training sequences."""

    vocab: int = 16
    hidden: int = 8
    layers: int = 2
    heads: int = 2
    intermediate: int = 32
    n_train: int = 48
    seq_len: int = 10
    n_queries: int = 6
    prompt_len: int = 6
    train_steps: int = 300
    lr: float = 1e-2
    dampings: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    fisher_repeats: int = 2
    seed: int = 0

    @property
    def model_label(self) -> str:
        sizes = {k: v for k, v in asdict(self).items() if k not in ("dampings", "fisher_repeats")}
        return "markov-gpt-neox-" + "-".join(f"{k}{v}" for k, v in sizes.items())


def markov_sequences(n: int, length: int, vocab: int, chain_seed: int, draw_seed: int) -> list[list[int]]:
    """``n`` walks of ``length`` tokens on the chain of ``chain_seed`` (2 successors per token)."""
    successors = torch.randint(0, vocab, (vocab, 2), generator=torch.Generator().manual_seed(chain_seed))
    gen = torch.Generator().manual_seed(draw_seed)
    walks = []
    for _ in range(n):
        walk = [int(torch.randint(0, vocab, (1,), generator=gen))]
        for _ in range(length - 1):
            walk.append(int(successors[walk[-1], int(torch.randint(0, 2, (1,), generator=gen))]))
        walks.append(walk)
    return walks


@dataclass
class FidelityResult:
    rows: list[FidelityRow]
    final_loss: float  # training loss (token mean); uniform guessing is ln(vocab)
    n_pairs: int
    train_seconds: float
    config: FidelityConfig


def run_fidelity(config: FidelityConfig = FidelityConfig()) -> FidelityResult:
    """Train the model (float32, Adam, full batch), then :func:`fidelity_table` in float64."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    started = time.perf_counter()
    train = markov_sequences(config.n_train, config.seq_len, config.vocab, config.seed, config.seed + 1)
    ids = torch.tensor(train)
    with torch.random.fork_rng():  # seeded init without touching the caller's RNG state
        torch.manual_seed(config.seed)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=config.vocab, hidden_size=config.hidden, num_hidden_layers=config.layers,
            num_attention_heads=config.heads, intermediate_size=config.intermediate,
            max_position_embeddings=config.seq_len, attn_implementation="sdpa"))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in range(config.train_steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    train_seconds = time.perf_counter() - started
    model = model.double().eval()
    p = config.prompt_len
    held_out = markov_sequences(config.n_queries, config.seq_len, config.vocab, config.seed, config.seed + 2)
    queries = [query_example(s[:p], s[p:]) for s in held_out]
    docs = [document_example(s) for s in train]
    rows = fidelity_table(model, docs, queries, docs, config.dampings, config.fisher_repeats, config.seed)
    return FidelityResult(rows, loss, len(queries) * len(docs), train_seconds, config)


def fidelity_rows(result: FidelityResult, computed_at: dt.datetime | None = None) -> pa.Table:
    """EVAL_FIDELITY rows: one per (method, damping); reference = exact damped GGN."""
    now = computed_at or now_utc()
    rows = [{"method": r.method, "reference": "exact-ggn", "damping": r.damping, "spearman": r.spearman,
             "pearson": r.pearson, "n_pairs": result.n_pairs, "seconds": r.seconds,
             "model": result.config.model_label, "computed_at": now} for r in result.rows]
    return pa.Table.from_pylist(rows, schema=tables.EVAL_FIDELITY.schema)
