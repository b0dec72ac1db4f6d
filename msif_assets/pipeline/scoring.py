"""Scoring step: every configured method over one shard's candidate chunks.

Influence methods stack all their query vectors along Q, so one forward+backward per
candidate on θ_pt serves MS-IF (every damping) and GDP together, and one on θ_ft serves SS-IF.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pyarrow as pa
import torch

from ..engine import lowrank, make_batches, score_examples
from ..engine.baselines import BM25Index, representation_similarity
from ..lake import tables
from ..lake.layout import LakeLayout
from .corpus import chunk_examples
from .factors import pad_id_of
from . import query_store
from .memory import check_scoring_block_fits
from .models import ModelPair
from .queries import query_examples, query_texts
from .settings import ComputeSettings, ScoreKey


CANDIDATES_PER_PASS = 512  # bounds the (N, Q, modules) float64 per-module scores of one pass


@dataclass(frozen=True)
class CandidateCells:
    """One shard's (query, chunk) candidate pairs and their cells in the (N chunks, Q queries)
    score matrices; pairs of queries that are no longer in the queries table are left out."""

    query_ids: list[str]  # (P,)
    chunk_ids: list[str]  # (P,)
    rows: torch.Tensor  # (P,) int64, index into the shard's chunk order
    cols: torch.Tensor  # (P,) int64, index into the query order

    @classmethod
    def of(cls, candidates: pa.Table, chunk_ids: list[str], qids: list[str]) -> "CandidateCells":
        row_of = {c: i for i, c in enumerate(chunk_ids)}
        col_of = {q: j for j, q in enumerate(qids)}
        pairs = [(q, c) for q, c in zip(candidates.column("query_id").to_pylist(), candidates.column("chunk_id").to_pylist())
                 if q in col_of]
        missing = sorted({c for _, c in pairs if c not in row_of})
        if missing:
            raise ValueError(f"the candidates name chunk(s) {', '.join(missing[:5])} that the chunks table does not hold; "
                             "rematerialize doc_chunks and candidates for this shard")
        return cls([q for q, _ in pairs], [c for _, c in pairs],
                   torch.tensor([row_of[c] for _, c in pairs], dtype=torch.long),
                   torch.tensor([col_of[q] for q, _ in pairs], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.query_ids)

    def rows_by_query(self) -> dict[str, list[int]]:
        """query id → rows of its candidate chunks."""
        by_query: dict[str, list[int]] = {}
        for q, r in zip(self.query_ids, self.rows.tolist()):
            by_query.setdefault(q, []).append(r)
        return by_query


def _stacked_scores(model, specs, keyed_vectors: dict[ScoreKey, dict], examples, settings: ComputeSettings, pad_id: int) -> dict:
    """``{key: (total, mlp, attn)}`` each (N, Q): all keys' vectors stacked along Q, so one
    forward+backward per candidate serves every key; candidates go CANDIDATES_PER_PASS at a time."""
    keys = list(keyed_vectors)
    if not keys:
        return {}
    n_queries = lowrank.n_queries(next(iter(keyed_vectors[keys[0]].values())))
    stacked = {s.name: lowrank.stack([keyed_vectors[k][s.name] for k in keys]) for s in specs}
    pieces = []
    for start in range(0, len(examples), CANDIDATES_PER_PASS):
        scores = score_examples(model, specs, stacked, examples[start : start + CANDIDATES_PER_PASS], settings.batch_size, pad_id)
        pieces.append((scores.total.cpu(), scores.group_total("mlp").cpu(), scores.group_total("attn").cpu()))
    parts = [torch.cat([p[i] for p in pieces], 0) for i in range(3)]
    return {k: tuple(p[:, i * n_queries : (i + 1) * n_queries] for p in parts) for i, k in enumerate(keys)}


def _influence_scores(layout: LakeLayout, pair: ModelPair, qids: list[str], examples, candidate_rows: dict[str, list[int]],
                      settings: ComputeSettings) -> tuple[dict, list[str]]:
    """MS-IF, SS-IF and GDP columns ``{key: (total, mlp, attn)}`` (N, Q), one stored query block
    at a time (a block's vectors are the only ones in memory), and the ids of queries whose
    stored vectors are non-finite. A block runs only the chunks that are candidates of its own
    queries (``candidate_rows``: query id → rows of ``examples``); every other cell is NaN and
    never read."""
    keys = settings.gradient_keys
    if not keys:
        return {}, []
    check_scoring_block_fits(pair.specs, settings, len(qids), min(len(examples), CANDIDATES_PER_PASS))
    parts: dict[ScoreKey, list[tuple]] = {k: [] for k in keys}
    seen: list[str] = []
    nonfinite: list[str] = []
    for block in range(query_store.block_count(layout, pair.ids, keys[0])):
        block_ids = query_store.block_query_ids(layout, pair.ids, keys[0], block)
        vectors = {k: query_store.read_block(layout, pair.ids, k, block) for k in keys}
        nonfinite += [block_ids[j] for j in _nonfinite_rows(vectors)]
        on_pt = {k: v for k, v in vectors.items() if not k.on_finetuned_model}
        on_ft = {k: v for k, v in vectors.items() if k.on_finetuned_model}
        rows = sorted({r for q in block_ids for r in candidate_rows.get(q, ())})
        block_examples = [examples[r] for r in rows]
        block_scores = {}
        if rows:  # else no query of this block has a candidate in this shard; its cells stay NaN and unread
            block_scores = _stacked_scores(pair.pt.model, pair.specs, on_pt, block_examples, settings, pad_id_of(pair.pt))
            if on_ft and pair.ft.task == "causal_lm":
                block_scores.update(_stacked_scores(pair.ft.model, pair.specs, on_ft, block_examples, settings, pad_id_of(pair.ft)))
        for key in keys:
            if key.on_finetuned_model and pair.ft.task != "causal_lm":
                continue
            value = block_scores.get(key) or (torch.empty(0, len(block_ids), dtype=torch.float64),) * 3
            parts[key].append(tuple(_scatter_rows(p, rows, len(examples)) for p in value))
        seen += block_ids
    if seen != qids:
        raise ValueError(f"the stored query gradients hold queries {seen[:5]}… but the queries table has {qids[:5]}…; "
                         "rematerialize query_gradients")
    joined = {k: tuple(torch.cat([p[i] for p in v], 1) for i in range(3)) for k, v in parts.items() if v}
    return joined, sorted(set(nonfinite))


def _scatter_rows(block: torch.Tensor, rows: list[int], n_rows: int) -> torch.Tensor:
    """(len(rows), Qb) → (n_rows, Qb), NaN where a chunk was not run for this block."""
    full = torch.full((n_rows, block.shape[1]), float("nan"), dtype=block.dtype)
    full[rows] = block
    return full


def _nonfinite_rows(vectors: dict[ScoreKey, dict]) -> set[int]:
    rows: set[int] = set()
    for by_module in vectors.values():
        for v in by_module.values():
            for t in ((v.left, v.right) if isinstance(v, lowrank.LowRankQueries) else (v,)):
                rows |= set((~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)).nonzero().flatten().tolist())
    return rows


def score_shard(layout: LakeLayout, shard: str, pair: ModelPair, queries: pa.Table, settings: ComputeSettings) -> pa.Table:
    """Rows of tables.SCORES for every (candidate, query) pair of ``shard`` and every method."""
    candidates = tables.read_candidates(layout, shard)
    chunks = tables.read_chunks(layout, shard)
    wanted = set(candidates.column("chunk_id").to_pylist())
    chunks = chunks.filter(pa.compute.is_in(chunks.column("chunk_id"), pa.array(sorted(wanted), pa.string())))
    chunk_ids, doc_ids = chunks.column("chunk_id").to_pylist(), chunks.column("doc_id").to_pylist()
    qids = queries.column("query_id").to_pylist()
    if not chunk_ids:
        return tables.SCORES.schema.empty_table()

    cells = CandidateCells.of(candidates, chunk_ids, qids)
    pt_examples = chunk_examples(chunks, pair.pt.tokenizer.bos_token_id)
    results, nonfinite_queries = _influence_scores(layout, pair, qids, pt_examples, cells.rows_by_query(), settings)
    if "repsim" in settings.methods:
        pad = pad_id_of(pair.pt)
        cand = make_batches(pt_examples, settings.batch_size, pad, sort_by_length=False)
        qry = make_batches(query_examples(queries, pair.ft), settings.batch_size, pad, sort_by_length=False)
        results[ScoreKey("repsim")] = (representation_similarity(pair.pt.model, pair.ft.model, cand, qry, layer="last_block").cpu(), None, None)
    if "bm25" in settings.methods:
        index = BM25Index.build(chunks.column("text").to_pylist(), chunk_ids, stopwords=None)
        columns = [torch.from_numpy(index.scores(text)) for text in query_texts(queries)]
        results[ScoreKey("bm25")] = (torch.stack(columns, 1), None, None)
    _require_finite(shard, cells, chunk_ids, results, nonfinite_queries)
    return _rows(shard, cells, doc_ids, results, pair)


class NonFiniteScoresError(ValueError):
    """Scoring produced NaN/±Inf; nothing is written. The message names the shard, the methods,
    the (query, chunk) pairs and the likely cause."""


_FIRST = 5


def _require_finite(shard: str, cells: CandidateCells, chunk_ids: list[str], results: dict, nonfinite_vectors: list[str]) -> None:
    """Raise NonFiniteScoresError if any score, score_mlp or score_attn about to be written for
    this shard's candidate pairs is NaN or ±Inf (a NaN would sort first and top every ranking)."""
    if not len(cells):
        return
    rows, cols = cells.rows, cells.cols
    pairs = list(zip(cells.query_ids, cells.chunk_ids))
    problems, bad_pairs, bad_chunks = [], {}, set()
    for key, parts in results.items():
        columns, key_bad = [], torch.zeros(len(pairs), dtype=torch.bool)
        for column, matrix in zip(("score", "score_mlp", "score_attn"), parts):
            if matrix is None:
                continue
            bad = ~torch.isfinite(matrix[rows, cols])
            if bool(bad.any()):
                columns.append(column)
                key_bad |= bad
                bad_chunks |= _chunks_bad_for_all_their_queries(rows, bad, chunk_ids)
        if columns:
            damping = "" if key.damping is None else f" (damping {key.damping.label})"
            problems.append(f"{key.method}{damping}: {int(key_bad.sum())} of {len(pairs)} pairs ({', '.join(columns)})")
            for b in key_bad.nonzero().flatten().tolist():
                bad_pairs.setdefault(pairs[b], None)
    if not problems:
        return
    causes = []
    if nonfinite_vectors:
        causes.append(f"the stored query gradients of {_names(nonfinite_vectors)} are non-finite — rematerialize "
                      "query_gradients and look at the factor checks pt_factors_sane/ft_factors_sane")
    elif bad_chunks:
        causes.append(f"chunk(s) {_names(sorted(bad_chunks))} score non-finite against every query they are candidates of while the query "
                      "gradients are finite: the model's activations or gradients on their text leave the float32 range "
                      "— typically a huge (but finite) weight, such as the embedding row of a token these chunks contain "
                      "(often <unk>); inspect those rows of the model's embedding, fix or re-export the model")
    else:
        causes.append("activations or gradients overflowed float32 on some (query, chunk) pairs — look for huge "
                      "weights in the two models")
    shown = list(bad_pairs)
    examples = ", ".join(f"{q} × {c}" for q, c in shown[:_FIRST]) + (f" (+{len(shown) - _FIRST} more)" if len(shown) > _FIRST else "")
    raise NonFiniteScoresError(
        f"shard {shard}: non-finite influence scores — nothing written for this shard, so no NaN can be ranked. "
        f"Non-finite: {'; '.join(problems)}. First pairs (query_id × chunk_id): {examples}. "
        f"Likely cause: {'; '.join(causes)}."
    )


def _chunks_bad_for_all_their_queries(rows: torch.Tensor, bad: torch.Tensor, chunk_ids: list[str]) -> set[str]:
    """Chunks whose every candidate pair is non-finite (``rows``/``bad``: one entry per pair)."""
    pairs_per_row = torch.bincount(rows, minlength=len(chunk_ids))
    bad_per_row = torch.bincount(rows[bad], minlength=len(chunk_ids))
    return {chunk_ids[i] for i in ((bad_per_row == pairs_per_row) & (pairs_per_row > 0)).nonzero().flatten().tolist()}


def _names(items: list[str]) -> str:
    return ", ".join(items[:_FIRST]) + (f" (+{len(items) - _FIRST} more)" if len(items) > _FIRST else "")


def _rows(shard: str, cells: CandidateCells, doc_ids: list[str], results: dict, pair: ModelPair) -> pa.Table:
    now = dt.datetime.now(dt.timezone.utc)
    cell_list = list(zip(cells.query_ids, cells.chunk_ids, cells.rows.tolist(), cells.cols.tolist()))
    rows = []
    for key, (total, mlp, attn) in results.items():
        block = []
        for q, c, i, j in cell_list:
            block.append({
                "query_id": q, "doc_id": doc_ids[i], "chunk_id": c, "shard": shard, **key.columns,
                "score": float(total[i, j]),
                "score_mlp": None if mlp is None else float(mlp[i, j]),
                "score_attn": None if attn is None else float(attn[i, j]),
                "pt_model": pair.ids.pt, "ft_model": pair.ids.ft, "computed_at": now,
            })
        block.sort(key=lambda r: (r["query_id"], -r["score"], r["chunk_id"]))
        rank, last = 0, None
        for r in block:
            rank = rank + 1 if r["query_id"] == last else 1
            last = r["query_id"]
            r["rank"] = rank
        rows += block
    return pa.Table.from_pylist(rows, schema=tables.SCORES.schema)
