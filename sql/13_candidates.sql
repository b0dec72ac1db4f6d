-- candidates: the chunks scored for each query (KNN over embeddings, BM25, or all) (tables.CANDIDATES).
CREATE OR REPLACE VIEW candidates AS
SELECT query_id, doc_id, chunk_id, shard, source, knn_distance
FROM read_parquet('${LAKE}/candidates/candidates.parquet', union_by_name = true);
