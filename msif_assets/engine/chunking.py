"""Split documents into model-window-sized token chunks (pure; no storage).

A document longer than the model's window is never truncated: it becomes several
chunks, each at most ``max_len`` tokens, that together cover every token. Each chunk
keeps ``doc_id`` and its index so scores can be aggregated back per document.

Chunk rows (dicts):
    doc_id str, chunk_id str (``f"{doc_id}#{chunk_index}"``, unique because the index
    after the last ``#`` has no ``#``), chunk_index int (0-based), n_chunks int,
    n_tokens int, token_ids list[int], text str (the chunk's text, for embedding, BM25
    and display); ``shard`` is copied through when the input row has one.

Chunk text comes from the fast tokenizer's character offsets (``text[start of first
token : end of last token]``); slow tokenizers fall back to ``tokenizer.decode``.
Token ids are tokenized without special tokens; the caller adds BOS/EOS if its model
needs them and sizes ``max_len`` accordingly.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

__all__ = ["chunk_token_ids", "chunk_documents", "chunk_id_for"]


def chunk_id_for(doc_id: str, chunk_index: int) -> str:
    return f"{doc_id}#{chunk_index}"


def _window_spans(n: int, max_len: int, stride: int | None) -> list[tuple[int, int]]:
    """(start, end) index pairs of the windows over ``n`` items (see chunk_token_ids)."""
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    step = max_len if stride is None else stride
    if not isinstance(step, int) or not 1 <= step <= max_len:
        raise ValueError(f"stride must be an integer in [1, max_len={max_len}], got {stride!r}")
    spans: list[tuple[int, int]] = []
    start = 0
    while start < n:
        end = min(start + max_len, n)
        spans.append((start, end))
        if end == n:
            break
        start += step
    return spans


def chunk_token_ids(ids: list[int], max_len: int, stride: int | None = None) -> list[list[int]]:
    """Windows of at most ``max_len`` ids covering ``ids`` in order.

    ``stride`` is the distance between window starts (default ``max_len``: disjoint
    windows covering each token exactly once); ``stride < max_len`` makes windows
    overlap by ``max_len - stride`` tokens. The last window always ends at the last id;
    an empty input gives no windows.
    """
    return [list(ids[start:end]) for start, end in _window_spans(len(ids), max_len, stride)]


def chunk_documents(
    tokenizer: Any,
    docs: Iterable[Mapping[str, Any]],
    max_len: int,
    stride: int | None = None,
    batch_size: int = 256,
) -> Iterator[dict[str, Any]]:
    """Yield chunk rows for every document (rows need ``doc_id`` and ``text``).

    Raises ValueError naming the document when a row lacks a field or its text
    tokenizes to nothing (nothing is dropped silently).
    """
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    batch: list[Mapping[str, Any]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_size:
            yield from _chunk_batch(tokenizer, batch, max_len, stride, use_offsets)
            batch = []
    if batch:
        yield from _chunk_batch(tokenizer, batch, max_len, stride, use_offsets)


def _chunk_batch(tokenizer: Any, batch: list[Mapping[str, Any]], max_len: int,
                 stride: int | None, use_offsets: bool) -> Iterator[dict[str, Any]]:
    for doc in batch:
        for field in ("doc_id", "text"):
            if not isinstance(doc.get(field), str):
                raise ValueError(f"chunk_documents: row {doc.get('doc_id')!r} needs a string {field!r}")
    texts = [doc["text"] for doc in batch]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=use_offsets,
                        truncation=False, verbose=False)
    for i, doc in enumerate(batch):
        ids: list[int] = list(encoded["input_ids"][i])
        if not ids:
            raise ValueError(f"chunk_documents: document {doc['doc_id']!r} tokenizes to no tokens; "
                             "reject it upstream or fix its text")
        spans = _window_spans(len(ids), max_len, stride)
        offsets = encoded["offset_mapping"][i] if use_offsets else None
        for index, (start, end) in enumerate(spans):
            token_ids = ids[start:end]
            if offsets is not None:
                text = doc["text"][offsets[start][0]:offsets[end - 1][1]]
            else:
                text = tokenizer.decode(token_ids, skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
            row: dict[str, Any] = {
                "doc_id": doc["doc_id"],
                "chunk_id": chunk_id_for(doc["doc_id"], index),
                "chunk_index": index,
                "n_chunks": len(spans),
                "n_tokens": len(token_ids),
                "token_ids": token_ids,
                "text": text,
            }
            if "shard" in doc:
                row["shard"] = doc["shard"]
            yield row
