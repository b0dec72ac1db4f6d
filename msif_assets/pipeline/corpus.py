"""Corpus steps: inbox file → documents (+ rejects) → token chunks → embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..engine import LMExample, document_example
from ..engine.chunking import chunk_documents
from ..lake import tables
from ..lake.embeddings import encode_texts
from ..lake.inputs import CORPUS_SUFFIXES, corpus_reject_source, read_corpus_shard, shard_key_from_path
from ..lake.layout import LakeLayout
from ..lake.vectors import ChunkVectorStore, with_vectors

def inbox_shards(inbox: str | Path) -> dict[str, list[Path]]:
    """Shard key → its files in the inbox (one file = one shard; the key is the file stem)."""
    root = Path(inbox)
    if not root.is_dir():
        return {}
    shards: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix in CORPUS_SUFFIXES and not path.name.startswith("."):
            shards.setdefault(shard_key_from_path(path), []).append(path)
    return shards


@dataclass(frozen=True)
class IngestResult:
    documents: int
    rejects: int
    files: tuple[str, ...]


def ingest_shard(layout: LakeLayout, inbox: str | Path, shard: str) -> IngestResult:
    """Read one shard's inbox file(s) into ``shards/<shard>/docs.parquet`` and its rejects."""
    files = inbox_shards(inbox).get(shard)
    if not files:
        raise FileNotFoundError(
            f"shard {shard!r}: no file {shard}.jsonl/.parquet/.txt in the inbox {inbox}; "
            "it was removed or renamed — restore it or delete the partition"
        )
    read = read_corpus_shard(shard, files)
    tables.write_docs(layout, shard, read.docs)
    tables.write_rejects(layout, corpus_reject_source(shard), read.rejects)
    return IngestResult(read.docs.num_rows, read.rejects.num_rows, tuple(str(f) for f in files))


def chunk_shard(layout: LakeLayout, shard: str, tokenizer, max_tokens: int) -> pa.Table:
    """Split every document into chunks of at most ``max_tokens`` tokens (never truncating)."""
    docs = tables.read_docs(layout, shard).to_pylist()
    rows = list(chunk_documents(tokenizer, docs, max_tokens))
    chunks = pa.Table.from_pylist(rows, schema=tables.CHUNKS.schema) if rows else tables.CHUNKS.schema.empty_table()
    tables.write_chunks(layout, shard, chunks)
    return chunks


def embed_shard(layout: LakeLayout, shard: str, encoder) -> int:
    """Embed every chunk's text and replace the shard's rows in LanceDB (idempotent)."""
    chunks = tables.read_chunks(layout, shard)
    keep = chunks.select(["chunk_id", "doc_id", "shard", "text"])
    vectors = encode_texts(encoder, keep.column("text").to_pylist()) if chunks.num_rows else None
    data = with_vectors(keep, vectors) if vectors is not None else keep
    return ChunkVectorStore(layout.embeddings_dir).replace_shard(shard, data)


def chunk_examples(chunks: pa.Table, bos_id: int | None = None) -> list[LMExample]:
    """``log p(z)`` examples for chunk rows; a BOS token (when the tokenizer has one) gives
    the first real token a context, so every token of the chunk is scored."""
    prefix = [bos_id] if bos_id is not None else []
    return [document_example(prefix + list(ids)) for ids in chunks.column("token_ids").to_pylist()]
