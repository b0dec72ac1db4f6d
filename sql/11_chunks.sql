-- chunks: documents split into model-window token chunks (tables.CHUNKS).
-- Files: ${LAKE}/chunks/shard=<shard>/part.parquet; `shard` comes from the path.
CREATE OR REPLACE VIEW chunks AS
SELECT shard, doc_id, chunk_id, chunk_index, n_chunks, n_tokens, token_ids, text
FROM read_parquet('${LAKE}/chunks/*/part.parquet',
                  hive_partitioning = true, hive_types_autocast = false, union_by_name = true);
