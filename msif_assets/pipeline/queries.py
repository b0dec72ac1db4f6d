"""Query steps: read queries (generating missing completions), take ∇f on the fine-tuned
model, precondition per method and damping, and pick candidate chunks per shard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from ..engine.generation import greedy_completion
from ..engine.factored import low_rank_vectors
from ..engine import (
    Damping, EkfacFactors, LMExample, classification_example, preconditioned_queries, query_example, sequence_gradients,
    token_gradients,
)
from ..lake import tables
from ..lake.chat import ChatRendering, messages_from_meta, render_chat
from ..lake.embeddings import encode_texts
from ..lake.training_inputs import read_queries_file
from ..lake.layout import LakeLayout
from ..lake.models import LoadedModel
from ..lake.vectors import ChunkVectorStore
from . import query_store
from .memory import check_query_block_fits
from .models import ModelIds
from .settings import ComputeSettings, ScoreKey

log = logging.getLogger(__name__)

def load_queries(path: str | Path, ft: LoadedModel, settings: ComputeSettings) -> pa.Table:
    """Queries with every completion filled in: a missing one is the fine-tuned model's
    greedy answer, marked ``"completion_source": "generated"`` in ``meta``."""
    table = read_queries_file(path)
    rows = table.to_pylist()
    for row in rows:
        chat = _chat_rendering(row, ft)
        if chat is not None:  # readable in SQL and `msif top`; the tokens come from meta.messages
            row["prompt"] = chat.prompt_text
    # Every query must fit the model's window before anything runs on it: a given completion
    # with its prompt, a prompt to complete with room for at least one generated token.
    ids = [_query_ids(row, ft) for row in rows]
    check_query_window(rows, ids, ft)
    window = model_window(ft)
    for row, (prompt_ids, _) in zip(rows, ids):
        meta = json.loads(row["meta"]) if row["meta"] else {}
        if row["completion"] is None:
            if ft.task != "causal_lm":
                raise ValueError(f"{path}:{row['source_line']}: completion — a classification fine-tune needs the label to measure")
            max_new = settings.max_new_tokens if window is None else min(settings.max_new_tokens, window - len(prompt_ids))
            row["completion"] = greedy_completion(ft.model, ft.tokenizer, row["prompt"], max_new)
            if not row["completion"].strip():
                raise ValueError(f"{path}:{row['source_line']}: completion — the model generated an empty answer; give one")
            meta["completion_source"] = "generated"
        else:
            meta.setdefault("completion_source", "given")
        row["meta"] = json.dumps(meta, sort_keys=True)
    check_query_window(rows, [_query_ids(row, ft) for row in rows], ft)  # generated completions, re-tokenized
    return pa.Table.from_pylist(rows, schema=tables.QUERIES.schema)


_WINDOW_FIELDS = ("max_position_embeddings", "n_positions", "seq_length")


def model_window(model: LoadedModel) -> int | None:
    """The model's context window in tokens, from its config (``max_position_embeddings``,
    GPT-2's ``n_positions`` or ``seq_length``); None when the config names none."""
    return _window_field(model)[0]


def _window_field(model: LoadedModel) -> tuple[int | None, str]:
    """The window and the config.json field it comes from (``n_positions`` for GPT-2)."""
    config = getattr(model.model, "config", None)
    for field in _WINDOW_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value, getattr(config, "attribute_map", {}).get(field, field)
    return None, ""


def _chat_rendering(row: dict, ft: LoadedModel) -> ChatRendering | None:
    """A chat query (``messages`` in its meta) rendered with the fine-tuned model's template;
    None for a prompt/completion query."""
    from ..lake.inputs import InputError

    messages = messages_from_meta(row.get("meta"))
    if messages is None:
        return None
    where = f"{row['source_file']}:{row['source_line']}"
    if ft.task != "causal_lm":
        raise InputError(f"{where}: messages — query {row['query_id']!r}: a sequence-classification fine-tune measures "
                         "a label, not an assistant answer — write this query as prompt + completion (the label)")
    return render_chat(ft.tokenizer, messages, where, f"query {row['query_id']!r}", prepend_bos=True)


def _query_ids(row: dict, ft: LoadedModel) -> tuple[list[int], list[int] | None]:
    """The token ids a query is measured on: the prompt (after ``<bos>`` for a causal LM) and
    the completion (None when missing, and for a classification fine-tune, where it names the label).
    A chat query's are its template rendering's, split where the generation prompt ends."""
    chat = _chat_rendering(row, ft)
    if chat is not None:
        return chat.prompt_ids, chat.completion_ids
    tok = ft.tokenizer
    prompt = list(tok(row["prompt"], add_special_tokens=False)["input_ids"])
    if ft.task == "sequence_classification":
        return prompt, None
    if tok.bos_token_id is not None:
        prompt = [tok.bos_token_id] + prompt
    completion = None if row["completion"] is None else list(tok(row["completion"], add_special_tokens=False)["input_ids"])
    return prompt, completion


def check_query_window(rows: Sequence[dict], ids: Sequence[tuple[list[int], list[int] | None]], ft: LoadedModel) -> None:
    """Raise InputError naming every query longer than the fine-tuned model's window (query id,
    source line, token count, window): a token past the window has no position to take (GPT-2
    fails with 'index out of range') or is silently scored past what the model was trained on."""
    from ..lake.inputs import InputError

    window, field = _window_field(ft)
    if window is None:
        return
    bos = ft.task == "causal_lm" and ft.tokenizer.bos_token_id is not None
    problems = []
    for row, (prompt, completion) in zip(rows, ids):
        n_prompt = len(prompt) - bos
        where = f"{row['source_file']}:{row['source_line']}" if row.get("source_file") else "queries table"
        parts = ("<bos> + " if bos else "") + f"{n_prompt} prompt"
        if completion is None and ft.task == "causal_lm":
            if len(prompt) + 1 > window:
                problems.append(f"{row['query_id']!r} ({where}): {len(prompt)} tokens ({parts}) without a completion, "
                                "no room in the window for a generated one")
            continue
        n = len(prompt) + len(completion or ())
        if n > window:
            what = f"{parts} + {len(completion)} completion" if completion is not None else parts
            problems.append(f"{row['query_id']!r} ({where}): {n} tokens ({what})")
    if problems:
        model_dir = getattr(getattr(ft, "info", None), "path", None)
        source = f" ({field} in {model_dir / 'config.json'})" if model_dir else f" ({field})"
        shown = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more" if len(problems) > 10 else "")
        raise InputError(
            f"{len(problems)} of {len(rows)} queries do not fit the fine-tuned model's window of {window} tokens"
            f"{source}: {shown} — a token past the window has no position in the model (GPT-2 fails with 'index out "
            f"of range'; rotary models score it silently beyond what they were trained on). Shorten each named query's "
            f"prompt (and completion) to at most {window} tokens in total{' (counting <bos>)' if bos else ''}, or remove it "
            "from the queries file"
        )


def query_examples(queries: pa.Table, ft: LoadedModel) -> list[LMExample]:
    """Prompt and completion are tokenized separately so the measured tokens are exactly the
    completion's; for a classification fine-tune the completion names the label. Raises
    InputError, before any compute, naming every query longer than the model's window."""
    rows = queries.to_pylist()
    ids = [_query_ids(row, ft) for row in rows]
    check_query_window(rows, ids, ft)
    out = []
    for row, (prompt, completion) in zip(rows, ids):
        if ft.task == "sequence_classification":
            from .factors import _label_index

            out.append(classification_example(prompt, _label_index(row["completion"], ft.model.config.label2id or {})))
            continue
        out.append(query_example(prompt, completion))
    return out


def write_query_gradients(layout: LakeLayout, ft: LoadedModel, specs, queries: pa.Table, pt_factors: EkfacFactors,
                          ft_factors: EkfacFactors, ids: ModelIds, settings: ComputeSettings) -> list[Path]:
    """∇f on θ_ft, preconditioned for every configured method × damping (low-rank with
    ``query_rank``), written one block of ``query_batch_size`` queries at a time: memory holds one
    block's gradients and vectors and one module's factors, whatever the number of queries."""
    examples, query_ids = query_examples(queries, ft), queries.column("query_id").to_pylist()
    max_tokens = max((len(e.input_ids) for e in examples), default=0)
    check_query_block_fits(specs, settings, len(examples), "query_gradients", max_tokens)
    size = settings.query_batch_size or max(len(examples), 1)
    n_blocks = -(-len(examples) // size)
    paths: list[Path] = []
    started = time.perf_counter()
    for key in settings.gradient_keys:
        query_store.unpublish(layout, ids, key)
    for block, start in enumerate(range(0, len(examples), size)):
        vectors = block_vectors(ft, specs, examples[start : start + size], pt_factors, ft_factors, settings)
        for key in settings.gradient_keys:
            paths.append(query_store.write_block(layout, ids, key, block, vectors[key], query_ids[start : start + size]))
        del vectors
        log.info("query_gradients: block %d/%d (queries %d–%d of %d) written, %.1fs", block + 1, n_blocks, start + 1,
                 min(start + size, len(examples)), len(examples), time.perf_counter() - started)
    for key in settings.gradient_keys:
        query_store.publish(layout, ids, key, n_blocks, len(examples))
    return paths


def block_vectors(ft: LoadedModel, specs, examples: list[LMExample], pt_factors: EkfacFactors, ft_factors: EkfacFactors,
                  settings: ComputeSettings) -> dict[ScoreKey, query_store.QueryVectors]:
    """One block's vectors ``{key: {module: vectors}}``, module by module: only that module's
    factors are read from the factor files, and its gradients are dropped once used."""
    from .factors import pad_id_of

    rank = settings.query_rank
    gradients: dict = (token_gradients if rank > 0 else sequence_gradients)(ft.model, specs, examples, settings.batch_size, pad_id_of(ft))
    out: dict[ScoreKey, query_store.QueryVectors] = {key: {} for key in settings.gradient_keys}
    for spec in specs:
        pt_module, ft_module = pt_factors.select([spec.name]), ft_factors.select([spec.name])
        grads = gradients.pop(spec.name)
        ft_stages: dict = {}  # this module's fine-tuned stage, shared by SS-IF and MS-IF
        for key in settings.gradient_keys:
            damping = key.damping or Damping()
            if rank > 0:
                out[key][spec.name] = low_rank_vectors(key.method, grads, spec.name, rank, settings.inner_rank, pt_module, ft_module, damping,
                                                           ft_stages)
            else:
                out[key][spec.name] = preconditioned_queries(key.method, {spec.name: grads}, pt_module, ft_module, damping)[spec.name]
    return out


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
