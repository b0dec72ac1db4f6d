-- query_summary: one row per query (what `msif queries` prints): where its completion came
-- from ('given' in the queries file, or 'generated' by the fine-tuned model), how many
-- chunks were chosen as its candidates and how many have influence scores (any method).
CREATE OR REPLACE VIEW query_summary AS
WITH
  c AS (SELECT query_id, count(DISTINCT (shard, chunk_id)) AS n_candidates FROM candidates GROUP BY query_id),
  s AS (SELECT query_id, count(DISTINCT (shard, chunk_id)) AS n_scored,
               count(DISTINCT (method, damping_kind, damping)) AS n_score_groups
        FROM influence GROUP BY query_id)
SELECT q.query_id, q.prompt, q.completion,
       CASE WHEN json_valid(q.meta) THEN json_extract_string(q.meta, '$.completion_source') END AS completion_source,
       coalesce(c.n_candidates, 0) AS n_candidates,
       coalesce(s.n_scored, 0) AS n_scored,
       coalesce(s.n_score_groups, 0) AS n_score_groups
FROM queries AS q
LEFT JOIN c USING (query_id) LEFT JOIN s USING (query_id)
ORDER BY q.query_id;
