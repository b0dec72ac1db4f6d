"""Test data for storage-layer tests: small tables built with the lake's schemas."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from msif_assets.lake.tables import CHUNKS, DOCUMENTS, QUERIES, SCORES

FT = "ft0123abcd"
PT = "pt4567ef01"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def docs_table(shard: str, texts: dict[str, str]) -> pa.Table:
    rows = [{"shard": shard, "doc_id": d, "text": t, "meta": "{}", "source_file": f"{shard}.jsonl",
             "source_line": i + 1} for i, (d, t) in enumerate(texts.items())]
    return pa.Table.from_pylist(rows, schema=DOCUMENTS.schema)


def chunks_table(shard: str, texts: dict[str, str]) -> pa.Table:
    rows = [{"shard": shard, "doc_id": d, "chunk_id": f"{d}#0", "chunk_index": 0, "n_chunks": 1,
             "n_tokens": len(t.split()), "token_ids": list(range(len(t.split()))), "text": t}
            for d, t in texts.items()]
    return pa.Table.from_pylist(rows, schema=CHUNKS.schema)


def scores_table(shard: str, query_id: str, scores: dict[str, float], method: str = "ms-if",
                 damping: float = 0.1) -> pa.Table:
    ordered = sorted(scores.items(), key=lambda kv: -kv[1])
    rows = [{"query_id": query_id, "doc_id": d, "chunk_id": f"{d}#0", "shard": shard, "method": method,
             "damping": damping, "damping_kind": "relative", "score": s, "score_mlp": 0.75 * s,
             "score_attn": 0.25 * s, "rank": r + 1, "pt_model": PT, "ft_model": FT, "computed_at": NOW}
            for r, (d, s) in enumerate(ordered)]
    return pa.Table.from_pylist(rows, schema=SCORES.schema)


SHARD_TEXTS = {
    "s1": {"d1": "Paris is the capital of France", "d2": "Bananas are yellow"},
    "s2": {"d3": "The Eiffel tower is in Paris", "d4": "Cats sleep a lot"},
}
SHARD_SCORES = {"s1": {"d1": 3.0, "d2": -1.0}, "s2": {"d3": 2.0, "d4": 0.5}}


def queries_table() -> pa.Table:
    return pa.Table.from_pylist([{"query_id": "q1", "prompt": "The capital of France is", "completion": " Paris",
                                  "gold_doc_ids": ["d1"], "meta": "{}", "source_file": "queries.jsonl",
                                  "source_line": 1}], schema=QUERIES.schema)
