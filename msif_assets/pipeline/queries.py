"""Query steps: read queries (generating missing completions), take ∇f on the fine-tuned
model, precondition per method and damping, and pick candidate chunks per shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from ..engine.generation import greedy_completion
from ..engine import Damping, EkfacFactors, LMExample, classification_example, preconditioned_queries, query_example, sequence_gradients
from ..lake import tables
from ..lake.embeddings import encode_texts
from ..lake.factor_store import load_tensors, save_tensors
from ..lake.inputs import read_queries_file
from ..lake.layout import LakeLayout
from ..lake.models import LoadedModel
from ..lake.vectors import ChunkVectorStore
from .models import ModelIds
from .settings import ComputeSettings, ScoreKey

def load_queries(path: str | Path, ft: LoadedModel, settings: ComputeSettings) -> pa.Table:
    """Queries with every completion filled in: a missing one is the fine-tuned model's
    greedy answer, marked ``"completion_source": "generated"`` in ``meta``."""
    table = read_queries_file(path)
    rows = table.to_pylist()
    for row in rows:
        meta = json.loads(row["meta"]) if row["meta"] else {}
        if row["completion"] is None:
            if ft.task != "causal_lm":
                raise ValueError(f"{path}:{row['source_line']}: completion — a classification fine-tune needs the label to measure")
            row["completion"] = greedy_completion(ft.model, ft.tokenizer, row["prompt"], settings.max_new_tokens)
            if not row["completion"].strip():
                raise ValueError(f"{path}:{row['source_line']}: completion — the model generated an empty answer; give one")
            meta["completion_source"] = "generated"
        else:
            meta.setdefault("completion_source", "given")
        row["meta"] = json.dumps(meta, sort_keys=True)
    return pa.Table.from_pylist(rows, schema=tables.QUERIES.schema)


def query_examples(queries: pa.Table, ft: LoadedModel) -> list[LMExample]:
    """Prompt and completion are tokenized separately so the measured tokens are exactly the
    completion's; for a classification fine-tune the completion names the label."""
    tok = ft.tokenizer
    out = []
    for row in queries.to_pylist():
        prompt = list(tok(row["prompt"], add_special_tokens=False)["input_ids"])
        if ft.task == "sequence_classification":
            from .factors import _label_index

            out.append(classification_example(prompt, _label_index(row["completion"], ft.model.config.label2id or {})))
            continue
        if tok.bos_token_id is not None:
            prompt = [tok.bos_token_id] + prompt
        out.append(query_example(prompt, list(tok(row["completion"], add_special_tokens=False)["input_ids"])))
    return out


def compute_query_vectors(
    ft: LoadedModel, specs, queries: pa.Table, pt_factors: EkfacFactors, ft_factors: EkfacFactors, settings: ComputeSettings
) -> dict[ScoreKey, dict[str, torch.Tensor]]:
    """``{key: {module: (Q, m, n)}}`` for every configured method × damping that needs one."""
    from .factors import pad_id_of

    grads = sequence_gradients(ft.model, specs, query_examples(queries, ft), settings.batch_size, pad_id_of(ft))
    return {
        key: preconditioned_queries(key.method, grads, pt_factors, ft_factors, key.damping or Damping())
        for key in settings.gradient_keys
    }


def save_query_vectors(layout: LakeLayout, vectors: dict[ScoreKey, dict], ids: ModelIds, query_ids: list[str]) -> list[Path]:
    paths = []
    for key, by_module in vectors.items():
        path = layout.query_gradients_file(ids.pt, ids.ft, key.method, key.tag)
        meta = {"method": key.method, "damping": key.tag, "query_ids": json.dumps(query_ids), "pt_model": ids.pt, "ft_model": ids.ft}
        save_tensors(path, {k: v.contiguous().cpu() for k, v in by_module.items()}, meta)
        paths.append(path)
    return paths


def load_query_vectors(layout: LakeLayout, keys: Sequence[ScoreKey], ids: ModelIds) -> dict[ScoreKey, dict[str, torch.Tensor]]:
    return {key: load_tensors(layout.query_gradients_file(ids.pt, ids.ft, key.method, key.tag))[0] for key in keys}


def query_texts(queries: pa.Table) -> list[str]:
    return [f"{p}{c}" if c and c[:1].isspace() else f"{p} {c}" for p, c in zip(queries.column("prompt").to_pylist(), queries.column("completion").to_pylist())]


def select_candidates(layout: LakeLayout, shard: str, queries: pa.Table, encoder, settings: ComputeSettings) -> pa.Table:
    """Candidate chunks of one shard per query: KNN in LanceDB (∪ BM25), or every chunk of a
    shard with at most ``all_chunks_below`` chunks."""
    chunks = tables.read_chunks(layout, shard)
    qids = queries.column("query_id").to_pylist()
    if chunks.num_rows == 0:
        return tables.CANDIDATES.schema.empty_table()
    if chunks.num_rows <= settings.all_chunks_below:
        rows = [
            {"query_id": q, "doc_id": d, "chunk_id": c, "shard": shard, "source": "all", "knn_distance": None}
            for q in qids for d, c in zip(chunks.column("doc_id").to_pylist(), chunks.column("chunk_id").to_pylist())
        ]
        return pa.Table.from_pylist(rows, schema=tables.CANDIDATES.schema)
    store = ChunkVectorStore(layout.embeddings_dir)
    hits: dict[tuple[str, str], dict] = {}
    vectors = encode_texts(encoder, query_texts(queries))
    for row in store.knn(np.asarray(vectors), settings.knn_k, shards=[shard]).to_pylist():
        qid = qids[row["query_idx"]]
        hits[(qid, row["chunk_id"])] = {"query_id": qid, "doc_id": row["doc_id"], "chunk_id": row["chunk_id"], "shard": shard,
                                        "source": "knn", "knn_distance": row["distance"]}
    if settings.bm25_k:
        for row in store.fts(query_texts(queries), settings.bm25_k, shards=[shard]).to_pylist():
            qid = qids[row["query_idx"]]
            key = (qid, row["chunk_id"])
            if key in hits:
                hits[key]["source"] = "knn+bm25"
            else:
                hits[key] = {"query_id": qid, "doc_id": row["doc_id"], "chunk_id": row["chunk_id"], "shard": shard,
                             "source": "bm25", "knn_distance": None}
    return pa.Table.from_pylist(list(hits.values()), schema=tables.CANDIDATES.schema)
