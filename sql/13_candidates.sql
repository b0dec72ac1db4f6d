-- candidates: the chunks scored for each query, per shard (KNN over embeddings, BM25, or all)
-- (tables.CANDIDATES). Files: ${LAKE}/candidates/shard=<shard>/part.parquet.
CREATE OR REPLACE VIEW candidates AS
SELECT query_id, doc_id, chunk_id, shard, source, knn_distance
FROM read_parquet('${LAKE}/candidates/*/part.parquet',
                  hive_partitioning = true, hive_types_autocast = false, union_by_name = true);
