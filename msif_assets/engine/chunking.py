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

Memory: a tokenizer call costs several hundred bytes per token (its encoding plus the
Python lists of ids and offsets), so a document longer than ``piece_chars`` characters is
tokenized in pieces of about that size. Each piece ends at whitespace and is tokenized
with ``_PIECE_CONTEXT`` (or more) characters of right context; the next piece starts at a
token start past the cut from which tokenizing the text alone gives the same tokens as the
piece did (checked by re-tokenizing a short window), and only the tokens before it are
kept. So pieces join on token boundaries of the whole text, and the ids and chunks equal
whole-text tokenization (tested for WordPiece, Metaspace and byte-level BPE, with and without
a prefix space). If no such boundary shows up in 8× the context (a tokenizer whose every
token depends on its left context), the first word start is used. Slow tokenizers (no
offsets) are cut at whitespace. The document's ids are kept as a compact int32 array and
its chunk rows are yielded one at a time, so memory stays a small multiple of its size.
"""

from __future__ import annotations

from array import array
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

__all__ = ["chunk_token_ids", "chunk_documents", "chunk_id_for"]


PIECE_CHARS = 1 << 16  # tokenize longer texts in pieces of about this many characters
_PIECE_CONTEXT = 1024  # right context (characters) tokenized past each cut and discarded


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
    piece_chars: int = PIECE_CHARS,
) -> Iterator[dict[str, Any]]:
    """Yield chunk rows for every document (rows need ``doc_id`` and ``text``).

    Documents are tokenized in batches of at most ``batch_size`` documents and about
    ``piece_chars`` characters; a longer document is tokenized alone, in pieces (see the
    module docstring). Raises ValueError naming the document when a row lacks a field or its
    text tokenizes to nothing (nothing is dropped silently).
    """
    _window_spans(0, max_len, stride)  # validate the window arguments before any work
    if not isinstance(piece_chars, int) or piece_chars < 1:
        raise ValueError(f"piece_chars must be a positive integer, got {piece_chars!r}")
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    batch: list[Mapping[str, Any]] = []
    batch_chars = 0
    for doc in docs:
        _check_doc(doc)
        if len(doc["text"]) > piece_chars:
            if batch:
                yield from _chunk_batch(tokenizer, batch, max_len, stride, use_offsets)
                batch, batch_chars = [], 0
            yield from _chunk_long(tokenizer, doc, max_len, stride, use_offsets, piece_chars)
            continue
        batch.append(doc)
        batch_chars += len(doc["text"])
        if len(batch) >= batch_size or batch_chars >= piece_chars:
            yield from _chunk_batch(tokenizer, batch, max_len, stride, use_offsets)
            batch, batch_chars = [], 0
    if batch:
        yield from _chunk_batch(tokenizer, batch, max_len, stride, use_offsets)


def _check_doc(doc: Mapping[str, Any]) -> None:
    for field in ("doc_id", "text"):
        if not isinstance(doc.get(field), str):
            raise ValueError(f"chunk_documents: row {doc.get('doc_id')!r} needs a string {field!r}")


def _no_tokens(doc: Mapping[str, Any]) -> ValueError:
    return ValueError(f"chunk_documents: document {doc['doc_id']!r} tokenizes to no tokens; "
                      "reject it upstream or fix its text")


def _row(doc: Mapping[str, Any], index: int, n_chunks: int, token_ids: list[int], text: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "doc_id": doc["doc_id"],
        "chunk_id": chunk_id_for(doc["doc_id"], index),
        "chunk_index": index,
        "n_chunks": n_chunks,
        "n_tokens": len(token_ids),
        "token_ids": token_ids,
        "text": text,
    }
    if "shard" in doc:
        row["shard"] = doc["shard"]
    return row


def _chunk_batch(tokenizer: Any, batch: list[Mapping[str, Any]], max_len: int,
                 stride: int | None, use_offsets: bool) -> Iterator[dict[str, Any]]:
    texts = [doc["text"] for doc in batch]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=use_offsets,
                        truncation=False, verbose=False)
    for i, doc in enumerate(batch):
        ids: list[int] = list(encoded["input_ids"][i])
        if not ids:
            raise _no_tokens(doc)
        spans = _window_spans(len(ids), max_len, stride)
        offsets = encoded["offset_mapping"][i] if use_offsets else None
        for index, (start, end) in enumerate(spans):
            token_ids = ids[start:end]
            if offsets is not None:
                text = doc["text"][offsets[start][0]:offsets[end - 1][1]]
            else:
                text = tokenizer.decode(token_ids, skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
            yield _row(doc, index, len(spans), token_ids, text)


def _cut_at_whitespace(text: str, start: int, end: int) -> int:
    """The last whitespace position in ``text[start + (end - start) // 2 : end]``, else ``end``
    (never ``start``, so every piece makes progress)."""
    floor = start + max(1, (end - start) // 2)
    for i in range(end - 1, floor - 1, -1):
        if text[i].isspace():
            return i
    return end


def _next_whitespace(text: str, start: int, end: int) -> int:
    """The first whitespace position in ``text[start:end]``, else ``start``."""
    for i in range(start, min(end, len(text))):
        if text[i].isspace():
            return i
    return start


def _encode_piece(tokenizer: Any, text: str, start: int, stop: int, use_offsets: bool):
    """``(ids int64[m], char offsets int64[m, 2] into ``text``, or None)`` of ``text[start:stop]``."""
    enc = tokenizer(text[start:stop], add_special_tokens=False, return_offsets_mapping=use_offsets,
                    truncation=False, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(-1)
    if not use_offsets:
        return ids, None
    return ids, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2) + start


def _resync(tokenizer: Any, text: str, ids: np.ndarray, offsets: np.ndarray, cut: int, stop: int,
            best_effort: bool) -> int | None:
    """Where the next piece starts: a token start at or after ``cut`` from which tokenizing
    the text alone gives exactly this piece's tokens (so the left context does not matter
    there); None when no token start qualifies (the caller widens the context)."""
    limit = cut + (stop - cut) // 2  # kept tokens keep at least this much right context
    starts = sorted({int(x) for x in offsets[:, 0] if cut <= x <= limit})
    # likely word starts first: a token that starts with a space (BPE, Metaspace), then one
    # right after whitespace (WordPiece), then any other token start
    rank = lambda x: 0 if text[x] == " " else 1 if text[x - 1].isspace() else 2  # noqa: E731
    candidates = sorted(starts, key=lambda x: (rank(x), x))
    for start in candidates[:32]:
        window = min(stop, _next_whitespace(text, start + 256, start + 512))
        middle = stop if window == stop else start + (window - start) // 2
        again, again_offsets = _encode_piece(tokenizer, text, start, window, True)
        mine = (offsets[:, 0] >= start) & (offsets[:, 0] < middle)
        theirs = again_offsets[:, 0] < middle
        if mine.any() and np.array_equal(again[theirs], ids[mine]) and np.array_equal(again_offsets[theirs], offsets[mine]):
            return start
    return candidates[0] if candidates and best_effort else None


def _pieces(tokenizer: Any, text: str, use_offsets: bool, piece_chars: int):
    """Yield ``(ids, char offsets or None)`` of consecutive pieces of ``text`` (see module doc)."""
    n, pos = len(text), 0
    while pos < n:
        if n - pos <= piece_chars:
            yield _encode_piece(tokenizer, text, pos, n, use_offsets)
            return
        cut = _cut_at_whitespace(text, pos, pos + piece_chars)
        if not use_offsets:  # nothing to resynchronize on: cut at whitespace
            yield _encode_piece(tokenizer, text, pos, cut, False)
            pos = cut
            continue
        context = _PIECE_CONTEXT
        while True:
            stop = min(n, cut + context)
            if stop < n:  # end the right context at whitespace too, so no word is truncated
                stop = min(n, _next_whitespace(text, stop, stop + context))
            ids, offsets = _encode_piece(tokenizer, text, pos, stop, True)
            if stop == n:
                yield ids, offsets
                return
            start = _resync(tokenizer, text, ids, offsets, cut, stop, best_effort=context >= 8 * _PIECE_CONTEXT)
            if start is not None:
                keep = offsets[:, 0] < start
                yield ids[keep], offsets[keep]
                pos = start
                break
            context *= 2  # no verified token boundary in the context yet: widen it


def _chunk_long(tokenizer: Any, doc: Mapping[str, Any], max_len: int, stride: int | None,
                use_offsets: bool, piece_chars: int) -> Iterator[dict[str, Any]]:
    """Chunk rows of one long document, tokenized in pieces; only the ids (int32) and the
    character offsets at window boundaries are kept for the whole document."""
    text = doc["text"]
    step = max_len if stride is None else stride
    ids = array("i")
    starts: list[np.ndarray] = []  # char start of the tokens that open a window
    ends: list[np.ndarray] = []    # char end of the tokens that close a full window
    last_end = 0
    for piece_ids, offsets in _pieces(tokenizer, text, use_offsets, piece_chars):
        if not len(piece_ids):
            continue
        index = np.arange(len(ids), len(ids) + len(piece_ids))
        ids.extend(piece_ids.astype(np.int32).tolist())
        if offsets is not None:
            starts.append(offsets[index % step == 0, 0])
            closing = index + 1 - max_len
            ends.append(offsets[(closing >= 0) & (closing % step == 0), 1])
            last_end = int(offsets[-1, 1])
    if not ids:
        raise _no_tokens(doc)
    spans = _window_spans(len(ids), max_len, stride)
    start_chars = np.concatenate(starts) if starts else None
    end_chars = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    for index, (start, end) in enumerate(spans):
        token_ids = ids[start:end].tolist()
        if start_chars is not None:
            close = int(end_chars[index]) if end - start == max_len else last_end
            chunk_text = text[int(start_chars[index]):close]
        else:
            chunk_text = tokenizer.decode(token_ids, skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
        yield _row(doc, index, len(spans), token_ids, chunk_text)
