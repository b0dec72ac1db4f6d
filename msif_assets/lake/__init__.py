"""Storage layer: Parquet tables, LanceDB vectors, safetensors files, DuckDB catalog.

Modules (import what you need; this package imports nothing eagerly):
    atomic        atomic file writes and partition-directory swaps
    layout        LakeLayout: every path in the lake, partition-key validation
    tables        Arrow schemas and read/write of documents, chunks, queries,
                  candidates, scores, rejects, evaluation tables
    inputs        readers for user files (corpus shards -> docs + rejects; queries;
                  fine-tuning data)
    embeddings    offline sentence-transformer loading and encoding
    vectors       ChunkVectorStore (LanceDB): per-shard replace, KNN, full-text search
    factor_store  safetensors save/load with metadata
    models        model-directory validation, fingerprints, safe loading
    catalog       in-memory DuckDB views from sql/*.sql, read-only queries
    status        per-table row counts and partitions
No Dagster here.
"""
