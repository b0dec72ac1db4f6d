"""Corpus steps: inbox file → documents (+ rejects) → token chunks → embeddings.

The inbox is read by :func:`scan_inbox`: one file = one shard (key = file stem; suffixes
``.jsonl``/``.parquet``/``.arrow``/``.txt`` in any case), and one ``Dataset.save_to_disk``
directory = one shard (key = directory name; its files are hashed as the shard's input).
Nothing in it is skipped silently: hidden files, other suffixes, other directories and unsafe
names are listed in ``InboxScan.problems`` (the sensor and ``msif materialize`` log them), and
a path that resolves outside the inbox (a symlink to ``/etc/passwd``) is refused, never opened.

A ``doc_id`` is unique across the corpus: when two shards have it, the shard whose name
sorts first keeps the document and the other rejects its row (naming both). A shard's input
therefore is its own files plus the doc_ids of the shards named before it, and
:func:`inbox_versions` versions it so (the chained content hashes of those files).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..engine import LMExample, document_example
from ..engine.chunking import chunk_documents
from ..lake import tables
from ..lake.embeddings import encode_texts
from ..lake.atomic import atomic_write
from ..lake.storage import LakePath, parquet_location
from ..lake.hf_corpus import dataset_dir_problem, is_dataset_dir, shard_files
from ..lake.inputs import (
    CORPUS_SUFFIXES, CorpusColumns, InputError, corpus_reject_source, read_corpus_shard, reject_cross_shard_duplicates,
    shard_key_from_path,
)
from ..lake.layout import LakeLayout
from ..lake.vectors import ChunkVectorStore, with_vectors


@dataclass(frozen=True)
class InboxScan:
    """What the inbox holds: ``shards`` (key → files, sorted), ``ignored`` (one message per
    entry not read, saying what to do) and ``refused`` (key → messages for files that resolve
    outside the inbox: never read)."""

    root: Path
    shards: dict[str, list[Path]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return [*self.ignored, *(m for key in sorted(self.refused) for m in self.refused[key])]


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def scan_inbox(inbox: str | Path) -> InboxScan:
    """Classify every entry of the inbox (see the module docstring)."""
    root = Path(inbox)
    scan = InboxScan(root)
    if not root.is_dir():
        return scan
    real_root = root.resolve()
    suffixes = "/".join(CORPUS_SUFFIXES)
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            scan.ignored.append(f"{path}: hidden file (name starts with '.') — not read; "
                                "rename it without the leading '.' to load it as a shard")
            continue
        dataset = is_dataset_dir(path)
        if not dataset and (path.is_dir() or path.suffix.lower() not in CORPUS_SUFFIXES):
            what = (dataset_dir_problem(path) or "a directory") if path.is_dir() else f"suffix {path.suffix or '(none)'!r}"
            scan.ignored.append(f"{path}: {what} is not a corpus shard file — not read; give each shard as "
                                f"one {suffixes} file or Dataset.save_to_disk directory directly in the inbox "
                                "(e.g. convert CSV to JSON Lines with doc_id and text), or move it out of the inbox")
            continue
        try:
            key = shard_key_from_path(path)
        except InputError as exc:
            scan.ignored.append(f"{exc} — not read")
            continue
        target = path.resolve()
        # a dataset directory inside the inbox may still hold links to files outside it
        entries = [path, *(shard_files(path) if dataset else [])]
        leak = next((p for p in entries if not _inside(real_root, p.resolve())), None)
        if leak is not None:
            link = "is a symlink to" if leak.is_symlink() else "resolves to"
            scan.refused.setdefault(key, []).append(
                f"{leak}: {link} {leak.resolve()}, outside the inbox {real_root} — refused, never read; "
                "copy the file into the inbox instead")
            continue
        if not dataset and not target.is_file():
            scan.ignored.append(f"{path}: not a regular file ({'a broken symlink' if not target.exists() else 'not a file'}) "
                                "— not read; put the shard's file itself in the inbox")
            continue
        scan.shards.setdefault(key, []).append(path)
    return scan


def inbox_shards(inbox: str | Path) -> dict[str, list[Path]]:
    """Shard key → its files in the inbox (one file = one shard; the key is the file stem)."""
    return scan_inbox(inbox).shards


def _named_files(files: Iterable[Path]) -> Iterator[tuple[str, Path]]:
    """``(name, file)`` for each shard file, and for each file inside a dataset directory (``dir/file``)."""
    for entry in map(Path, files):
        for path in shard_files(entry):
            yield (path.relative_to(entry.parent).as_posix() if path != entry else entry.name), path


def files_stat(files: Iterable[Path]) -> str:
    """Cheap change signature of a shard's files (name, size, mtime, inode)."""
    parts = []
    for name, path in _named_files(files):
        st = os.stat(path)
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return "|".join(parts)


def files_digest(files: Iterable[Path]) -> str:
    """Content hash of a shard's files (names and bytes), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for name, path in _named_files(files):
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def inbox_versions(digests: Mapping[str, str]) -> dict[str, str]:
    """Data version of each shard's input from every shard's ``files_digest``: its own digest
    chained after those of the shards named before it (whose doc_ids take precedence)."""
    running = hashlib.sha256()
    versions = {}
    for shard in sorted(digests):
        running.update(f"{shard}\0{digests[shard]}\n".encode())
        versions[shard] = running.copy().hexdigest()[:24]
    return versions


@dataclass(frozen=True)
class IngestResult:
    documents: int
    rejects: int
    files: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    cross_shard_duplicates: int = 0


_DOC_IDS_SCHEMA = pa.schema([("doc_id", pa.string()), ("shard", pa.string()),
                             ("source_file", pa.string()), ("source_line", pa.int64())])
_STAT_KEY = b"msif.inbox_stat"


def _doc_ids_file(layout: LakeLayout, shard: str) -> LakePath:
    """Every in-shard-valid doc_id of a shard, before the cross-shard rule (later shards read it)."""
    return layout.shard_docs_file(shard).with_name("doc_ids.parquet")


def _read_key(files: list[Path], columns: CorpusColumns) -> str:
    """What a shard's doc_ids were read from: its files as they are now, and the column settings."""
    return f"{files_stat(files)}|{columns.text}|{columns.id}"


def _write_doc_ids(layout: LakeLayout, shard: str, docs: pa.Table, stat: str) -> None:
    table = docs.select(_DOC_IDS_SCHEMA.names).cast(_DOC_IDS_SCHEMA).replace_schema_metadata({_STAT_KEY: stat.encode()})
    atomic_write(_doc_ids_file(layout, shard), lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _valid_doc_ids(layout: LakeLayout, shard: str, files: list[Path], columns: CorpusColumns) -> pa.Table:
    """The in-shard-valid doc_ids of another shard: from its ``doc_ids.parquet`` when that was
    made from the files as they are now, else read from the files themselves (none while that
    shard is misconfigured: its own step fails naming the problem, and fixing it re-versions this one)."""
    path = _doc_ids_file(layout, shard)
    try:
        source, filesystem = parquet_location(path)
        if path.is_file() and (pq.read_schema(source, filesystem=filesystem).metadata or {}).get(_STAT_KEY) == _read_key(files, columns).encode():
            return pq.read_table(source, filesystem=filesystem, columns=_DOC_IDS_SCHEMA.names).cast(_DOC_IDS_SCHEMA)
    except (OSError, pa.ArrowException):
        pass  # unreadable or racing a rewrite: read the files
    try:
        docs = read_corpus_shard(shard, files, columns).docs
    except InputError:
        return _DOC_IDS_SCHEMA.empty_table()
    return docs.select(_DOC_IDS_SCHEMA.names).cast(_DOC_IDS_SCHEMA)


def _earlier_doc_ids(layout: LakeLayout, scan: InboxScan, shard: str, doc_ids: pa.Array, columns: CorpusColumns) -> pa.Table:
    """Documents of the shards named before ``shard`` whose doc_id is in ``doc_ids``."""
    wanted = doc_ids.combine_chunks() if isinstance(doc_ids, pa.ChunkedArray) else doc_ids
    parts = [_DOC_IDS_SCHEMA.empty_table()]
    for other in sorted(s for s in scan.shards if s < shard):
        table = _valid_doc_ids(layout, other, scan.shards[other], columns)
        parts.append(table.filter(pc.is_in(table.column("doc_id"), value_set=wanted)))
    return pa.concat_tables(parts)


def ingest_shard(layout: LakeLayout, inbox: str | Path, shard: str,
                 columns: CorpusColumns = CorpusColumns()) -> IngestResult:
    """Read one shard's inbox file(s) into ``shards/<shard>/docs.parquet`` and its rejects
    (bad rows, and doc_ids a shard named before it has)."""
    scan = scan_inbox(inbox)
    files = scan.shards.get(shard)
    if not files:
        if shard in scan.refused:
            raise InputError(f"shard {shard!r}: " + "; ".join(scan.refused[shard]))
        raise FileNotFoundError(
            f"shard {shard!r}: no file {shard}.jsonl/.parquet/.arrow/.txt or dataset directory {shard}/ "
            f"in the inbox {inbox}; "
            "it was removed or renamed — restore it or delete the partition"
        )
    stat = _read_key(files, columns)  # before reading: a file changed meanwhile never looks current
    read = read_corpus_shard(shard, files, columns)
    _write_doc_ids(layout, shard, read.docs, stat)
    earlier = _earlier_doc_ids(layout, scan, shard, read.docs.column("doc_id"), columns)
    kept, duplicates = reject_cross_shard_duplicates(read.docs, earlier)
    rejects = pa.concat_tables([read.rejects, duplicates])
    if duplicates.num_rows:
        rejects = rejects.sort_by([("file", "ascending"), ("line", "ascending")])
    tables.write_docs(layout, shard, kept)
    tables.write_rejects(layout, corpus_reject_source(shard), rejects)
    return IngestResult(kept.num_rows, rejects.num_rows, tuple(str(f) for f in files),
                        tuple(scan.refused.get(shard, ())), duplicates.num_rows)


_CHUNK_BATCH_ROWS = 4096
_CHUNK_BATCH_TOKENS = 1 << 18


def _doc_rows(docs: pa.Table) -> Iterator[dict]:
    for batch in docs.to_batches(max_chunksize=64):
        yield from batch.to_pylist()


def chunk_shard(layout: LakeLayout, shard: str, tokenizer, max_tokens: int) -> pa.Table:
    """Split every document into chunks of at most ``max_tokens`` tokens (never truncating).

    Rows become Arrow batches of at most ``_CHUNK_BATCH_ROWS`` rows / ``_CHUNK_BATCH_TOKENS``
    tokens as they are made, so Python objects never hold the whole shard (the returned table
    has one record batch per such group).
    """
    schema = tables.CHUNKS.schema
    parts: list[pa.Table] = []
    pending: list[dict] = []
    tokens = 0
    for row in chunk_documents(tokenizer, _doc_rows(tables.read_docs(layout, shard)), max_tokens):
        pending.append(row)
        tokens += row["n_tokens"]
        if len(pending) >= _CHUNK_BATCH_ROWS or tokens >= _CHUNK_BATCH_TOKENS:
            parts.append(pa.Table.from_pylist(pending, schema=schema))
            pending, tokens = [], 0
    if pending:
        parts.append(pa.Table.from_pylist(pending, schema=schema))
    chunks = pa.concat_tables(parts) if parts else schema.empty_table()
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
