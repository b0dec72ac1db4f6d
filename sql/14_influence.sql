-- influence: every influence score (tables.SCORES), all models and shards.
-- Files: ${LAKE}/scores/model=<ft_model>/shard=<shard>/part.parquet.
-- The stored `rank` is only within one shard partition, so `rank` is recomputed here
-- across shards: 1 = largest score per (ft_model, pt_model, query, method, damping).
CREATE OR REPLACE VIEW influence AS
SELECT query_id, doc_id, chunk_id, shard, method, damping, damping_kind,
       score, score_mlp, score_attn,
       CAST(row_number() OVER (
           PARTITION BY ft_model, pt_model, query_id, method, damping_kind, damping
           ORDER BY score DESC, shard, chunk_id) AS INTEGER) AS rank,
       pt_model, ft_model, computed_at
FROM read_parquet('${LAKE}/scores/*/*/part.parquet',
                  hive_partitioning = true, hive_types_autocast = false, union_by_name = true);
