-- shard_summary: per shard, how much made it through each stage of the lake.
CREATE OR REPLACE VIEW shard_summary AS
WITH
  d AS (SELECT shard, count(*) AS n_docs FROM documents GROUP BY shard),
  c AS (SELECT shard, count(*) AS n_chunks, CAST(sum(n_tokens) AS BIGINT) AS n_tokens FROM chunks GROUP BY shard),
  s AS (SELECT shard, count(*) AS n_scores, count(DISTINCT query_id) AS n_queries_scored
        FROM influence GROUP BY shard),
  r AS (SELECT substr(source, 8) AS shard, count(*) AS n_rejects
        FROM rejects WHERE starts_with(source, 'corpus-') GROUP BY ALL),
  shards AS (SELECT shard FROM d UNION SELECT shard FROM c UNION SELECT shard FROM s UNION SELECT shard FROM r)
SELECT shards.shard,
       coalesce(d.n_docs, 0) AS n_docs,
       coalesce(r.n_rejects, 0) AS n_rejects,
       coalesce(c.n_chunks, 0) AS n_chunks,
       coalesce(c.n_tokens, 0) AS n_tokens,
       coalesce(s.n_scores, 0) AS n_scores,
       coalesce(s.n_queries_scored, 0) AS n_queries_scored
FROM shards
LEFT JOIN d USING (shard) LEFT JOIN c USING (shard) LEFT JOIN s USING (shard) LEFT JOIN r USING (shard)
ORDER BY shards.shard;
