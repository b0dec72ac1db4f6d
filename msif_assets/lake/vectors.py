"""Chunk embeddings in LanceDB: per-shard idempotent replace, exact KNN, full-text search.

One LanceDB table ``chunks`` under ``<lake>/embeddings``:
    shard str, chunk_id str, doc_id str, text str, vector fixed_size_list<float32>[d]
Rows are unique on (shard, chunk_id). ``replace_shard`` is a single ``merge_insert``
commit (update matches, insert new, delete the shard's rows that are not in the new
data), so rerunning it yields the same rows and readers never see the shard half
replaced. Vectors are expected L2-normalized; distances are cosine distances. No ANN
index is built, so KNN is exact (flat scan).

Full-text search uses LanceDB's native BM25 index (works offline; tantivy is not
needed). Rows added after ``build_fts_index`` are still found (LanceDB scans unindexed
rows), and rebuilding the index refreshes it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msif_assets.lake.layout import validate_key
from msif_assets.lake.storage import as_lake_path, lancedb_storage_options

__all__ = ["ChunkVectorStore", "VectorStoreError", "with_vectors", "KNN_SCHEMA", "FTS_SCHEMA"]

TABLE_NAME = "chunks"
_KEY = ["shard", "chunk_id"]
_TEXT_COLUMNS = ("shard", "chunk_id", "doc_id", "text")
KNN_SCHEMA = pa.schema([("query_idx", pa.int32()), ("chunk_id", pa.string()), ("doc_id", pa.string()),
                        ("shard", pa.string()), ("distance", pa.float32())])
FTS_SCHEMA = pa.schema([("query_idx", pa.int32()), ("chunk_id", pa.string()), ("doc_id", pa.string()),
                        ("shard", pa.string()), ("score", pa.float32())])


class VectorStoreError(ValueError):
    """Data handed to the vector store is inconsistent (schema, dimension, shard)."""


def _store_schema(dim: int) -> pa.Schema:
    fields = [pa.field(name, pa.string(), nullable=False) for name in _TEXT_COLUMNS]
    return pa.schema(fields + [pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)])


def with_vectors(table: pa.Table, vectors: np.ndarray) -> pa.Table:
    """Append ``vectors`` (N, d) as a ``vector`` fixed-size-list<float32> column."""
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != table.num_rows:
        raise VectorStoreError(f"vectors must have shape ({table.num_rows}, d), got {arr.shape}")
    flat = pa.array(arr.reshape(-1), type=pa.float32())
    return table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, arr.shape[1]))


def _shard_filter(shards: Sequence[str] | None) -> str | None:
    if shards is None:
        return None
    keys = [validate_key(s, "shard") for s in shards]  # keys cannot contain quotes
    if not keys:
        raise VectorStoreError("shards=[] selects nothing; pass None for all shards")
    return "shard IN (" + ", ".join(f"'{k}'" for k in keys) + ")"


class ChunkVectorStore:
    """LanceDB-backed store of chunk vectors under ``path`` (a directory)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = as_lake_path(path)
        self._db = lancedb.connect(str(self.path), read_consistency_interval=timedelta(0),
                                   storage_options=lancedb_storage_options(self.path))

    def _table(self) -> Any | None:
        response = self._db.list_tables()
        names = set(response.tables)
        while response.page_token:
            response = self._db.list_tables(page_token=response.page_token)
            names.update(response.tables)
        return self._db.open_table(TABLE_NAME) if TABLE_NAME in names else None

    def dimension(self) -> int | None:
        """Vector dimension of the stored table, or None while the store is empty."""
        table = self._table()
        return None if table is None else table.schema.field("vector").type.list_size

    def count(self, shard: str | None = None) -> int:
        table = self._table()
        if table is None:
            return 0
        return table.count_rows(None if shard is None else _shard_filter([shard]))

    def shards(self) -> list[str]:
        table = self._table()
        if table is None:
            return []
        shards = table.search().select(["shard"]).limit(None).to_arrow().column("shard")
        return sorted(pc.unique(shards).to_pylist())

    def _prepare(self, shard: str, data: pa.Table) -> pa.Table:
        missing = [c for c in (*_TEXT_COLUMNS, "vector") if c not in data.column_names]
        if missing:
            raise VectorStoreError(f"replace_shard({shard!r}): missing column(s) {missing}")
        vec_type = data.schema.field("vector").type
        if pa.types.is_fixed_size_list(vec_type):
            dim = vec_type.list_size
        elif pa.types.is_list(vec_type) or pa.types.is_large_list(vec_type):
            lengths = set(pc.list_value_length(data.column("vector")).to_pylist())
            if len(lengths) > 1:
                raise VectorStoreError(f"replace_shard({shard!r}): vectors of different lengths {sorted(lengths)}")
            dim = lengths.pop() if lengths else self.dimension()
        else:
            raise VectorStoreError(f"replace_shard({shard!r}): column vector has type {vec_type}, expected a list")
        stored = self.dimension()
        if dim is None:
            raise VectorStoreError(f"replace_shard({shard!r}): cannot infer the vector dimension of empty data")
        if stored is not None and stored != dim:
            raise VectorStoreError(
                f"replace_shard({shard!r}): vectors have dimension {dim} but the store holds {stored}; "
                f"the embedding model changed — delete {self.path} and re-embed every shard"
            )
        data = data.select([*_TEXT_COLUMNS, "vector"]).cast(_store_schema(dim))
        if data.num_rows:
            if set(data.column("shard").unique().to_pylist()) != {shard}:
                raise VectorStoreError(f"replace_shard({shard!r}): rows of other shards present")
            if data.group_by("chunk_id").aggregate([]).num_rows != data.num_rows:
                raise VectorStoreError(f"replace_shard({shard!r}): duplicate chunk_id values")
            values = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if not np.all(np.isfinite(values)):
                raise VectorStoreError(f"replace_shard({shard!r}): non-finite values in vectors")
        return data

    def replace_shard(self, shard: str, data: pa.Table) -> int:
        """Make the store's rows of ``shard`` exactly ``data``; returns the row count."""
        validate_key(shard, "shard")
        table = self._table()
        if data.num_rows == 0:
            # an empty shard (empty file, every row rejected): no vectors to infer a dimension
            # from, and none needed — the shard's rows are simply gone
            if table is not None:
                table.delete(_shard_filter([shard]))
            return 0
        data = self._prepare(shard, data)
        if table is None:
            table = self._db.create_table(TABLE_NAME, schema=data.schema, exist_ok=True)
        (table.merge_insert(_KEY)
         .when_matched_update_all()
         .when_not_matched_insert_all()
         .when_not_matched_by_source_delete(_shard_filter([shard]))
         .execute(data))
        return data.num_rows

    def delete_shard(self, shard: str) -> None:
        table = self._table()
        if table is not None:
            table.delete(_shard_filter([shard]))

    def knn(self, query_vectors: np.ndarray, k: int, shards: Sequence[str] | None = None) -> pa.Table:
        """The ``k`` nearest chunks (cosine distance) of each query vector (Q, d).

        Returns KNN_SCHEMA rows ordered by (query_idx, distance).
        """
        queries = np.asarray(query_vectors, dtype=np.float32)
        if queries.ndim != 2:
            raise VectorStoreError(f"query_vectors must be 2-D (Q, d), got shape {queries.shape}")
        if k < 1:
            raise VectorStoreError(f"k must be >= 1, got {k}")
        table = self._table()
        if table is None or queries.shape[0] == 0:
            return KNN_SCHEMA.empty_table()
        if queries.shape[1] != self.dimension():
            raise VectorStoreError(f"query vectors have dimension {queries.shape[1]}, store has {self.dimension()}")
        where = _shard_filter(shards)
        parts = []
        for i, vector in enumerate(queries):
            query = table.search(vector, vector_column_name="vector").distance_type("cosine").limit(k)
            if where:
                query = query.where(where, prefilter=True)
            hits = query.select(["chunk_id", "doc_id", "shard", "_distance"]).to_arrow()
            parts.append(pa.table({
                "query_idx": pa.array([i] * hits.num_rows, pa.int32()),
                "chunk_id": hits.column("chunk_id"), "doc_id": hits.column("doc_id"),
                "shard": hits.column("shard"), "distance": hits.column("_distance").cast(pa.float32()),
            }, schema=KNN_SCHEMA))
        return pa.concat_tables(parts)

    def build_fts_index(self) -> None:
        """(Re)build the BM25 full-text index on ``text``."""
        from lancedb.index import FTS

        table = self._table()
        if table is not None:
            table.create_index("text", config=FTS(), replace=True)

    def _has_fts_index(self, table: Any) -> bool:
        return any(getattr(ix, "index_type", "") == "FTS" for ix in table.list_indices())

    def fts(self, query_texts: Sequence[str], k: int, shards: Sequence[str] | None = None) -> pa.Table:
        """BM25 top-``k`` chunks per query text (builds the index on first use)."""
        table = self._table()
        if table is None or not query_texts:
            return FTS_SCHEMA.empty_table()
        if not self._has_fts_index(table):
            self.build_fts_index()
            table = self._table()
        where = _shard_filter(shards)
        parts = []
        for i, text in enumerate(query_texts):
            query = table.search(text, query_type="fts").limit(k)
            if where:
                query = query.where(where, prefilter=True)
            hits = query.select(["chunk_id", "doc_id", "shard", "_score"]).to_arrow()
            parts.append(pa.table({
                "query_idx": pa.array([i] * hits.num_rows, pa.int32()),
                "chunk_id": hits.column("chunk_id"), "doc_id": hits.column("doc_id"),
                "shard": hits.column("shard"), "score": hits.column("_score").cast(pa.float32()),
            }, schema=FTS_SCHEMA))
        return pa.concat_tables(parts)
