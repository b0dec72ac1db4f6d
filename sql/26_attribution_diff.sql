-- attribution_diff: how each chunk's rank moved between two fine-tunes (or two checkpoints of
-- one fine-tune) of the same pre-trained model, on the same query, method and damping. Every
-- pair of fine-tuned models (ft_model hashes) that scored a query under one pt_model, method
-- and damping appears in both orders (ft_a, ft_b) and (ft_b, ft_a), so filter with
-- `WHERE ft_a = '<A>' AND ft_b = '<B>'` in the order you want. One row per chunk scored under
-- either model:
--   presence        'both', 'only_a' (scored under ft_a alone) or 'only_b'
--   rank_a, rank_b  the chunk's rank under each model, as in `influence` (1 = largest score,
--                   over every chunk that model scored for the query); NULL where not scored
--   rank_change     rank_a - rank_b: positive = rose (ranked higher) under ft_b, negative =
--                   fell; NULL unless presence = 'both'
--   score_*, percentile_*, n_scored_*  from influence_normalized; percentile_change =
--                   percentile_b - percentile_a (scale-free when the scored sets differ)
CREATE OR REPLACE VIEW attribution_diff AS
WITH
  s AS (SELECT ft_model, pt_model, query_id, method, damping_kind, damping,
               shard, chunk_id, doc_id, rank, score, percentile, n_scored
        FROM influence_normalized),
  g AS (SELECT DISTINCT ft_model, pt_model, query_id, method, damping_kind, damping FROM s),
  pairs AS (
    SELECT a.ft_model AS ft_a, b.ft_model AS ft_b, a.pt_model, a.query_id, a.method, a.damping_kind, a.damping
    FROM g AS a
    JOIN g AS b
      ON a.ft_model <> b.ft_model AND a.query_id = b.query_id AND a.method = b.method
     AND a.pt_model IS NOT DISTINCT FROM b.pt_model
     AND a.damping_kind IS NOT DISTINCT FROM b.damping_kind
     AND a.damping IS NOT DISTINCT FROM b.damping),
  sides AS (
    SELECT p.*, 'a' AS side, s.shard, s.chunk_id, s.doc_id, s.rank, s.score, s.percentile, s.n_scored
    FROM pairs AS p
    JOIN s ON s.ft_model = p.ft_a AND s.query_id = p.query_id AND s.method = p.method
          AND s.pt_model IS NOT DISTINCT FROM p.pt_model
          AND s.damping_kind IS NOT DISTINCT FROM p.damping_kind
          AND s.damping IS NOT DISTINCT FROM p.damping
    UNION ALL
    SELECT p.*, 'b' AS side, s.shard, s.chunk_id, s.doc_id, s.rank, s.score, s.percentile, s.n_scored
    FROM pairs AS p
    JOIN s ON s.ft_model = p.ft_b AND s.query_id = p.query_id AND s.method = p.method
          AND s.pt_model IS NOT DISTINCT FROM p.pt_model
          AND s.damping_kind IS NOT DISTINCT FROM p.damping_kind
          AND s.damping IS NOT DISTINCT FROM p.damping),
  merged AS (
    SELECT pt_model, ft_a, ft_b, query_id, method, damping_kind, damping, shard, chunk_id,
           any_value(doc_id) AS doc_id,
           max(rank) FILTER (WHERE side = 'a') AS rank_a,
           max(rank) FILTER (WHERE side = 'b') AS rank_b,
           max(score) FILTER (WHERE side = 'a') AS score_a,
           max(score) FILTER (WHERE side = 'b') AS score_b,
           max(percentile) FILTER (WHERE side = 'a') AS percentile_a,
           max(percentile) FILTER (WHERE side = 'b') AS percentile_b,
           max(n_scored) FILTER (WHERE side = 'a') AS n_scored_a,
           max(n_scored) FILTER (WHERE side = 'b') AS n_scored_b
    FROM sides
    GROUP BY pt_model, ft_a, ft_b, query_id, method, damping_kind, damping, shard, chunk_id)
SELECT pt_model, ft_a, ft_b, query_id, method, damping_kind, damping, shard, chunk_id, doc_id,
       CASE WHEN rank_a IS NOT NULL AND rank_b IS NOT NULL THEN 'both'
            WHEN rank_a IS NOT NULL THEN 'only_a' ELSE 'only_b' END AS presence,
       rank_a, rank_b, rank_a - rank_b AS rank_change,
       score_a, score_b, percentile_a, percentile_b, percentile_b - percentile_a AS percentile_change,
       n_scored_a, n_scored_b
FROM merged;

-- attribution_diff_summary: one row per (pt_model, ft_a, ft_b, query, method, damping) of
-- attribution_diff (so both orders of every pair):
--   n_a, n_b             chunks scored under each model
--   n_common             chunks scored under both; n_only_a, n_only_b: under one alone
--   spearman             Spearman rank correlation of score_a and score_b over the n_common
--                        chunks scored under both (ranks re-taken within them, ties get their
--                        average rank). Chunks scored under one model only are left out of it
--                        and counted in n_only_*. NULL when n_common < 2 or either model gives
--                        all of them the same score (the correlation is undefined).
--   n_rose, n_fell       chunks (of n_common) with rank_change > 0 (higher under ft_b) / < 0
--   mean_abs_rank_change mean |rank_change| over n_common
--   top10_overlap        chunks in the top 10 under both models
CREATE OR REPLACE VIEW attribution_diff_summary AS
WITH
  ranked AS (
    SELECT *,
           CASE WHEN presence = 'both' THEN
             rank() OVER (PARTITION BY pt_model, ft_a, ft_b, query_id, method, damping_kind, damping, presence
                          ORDER BY score_a)
             + (count(*) OVER (PARTITION BY pt_model, ft_a, ft_b, query_id, method, damping_kind, damping,
                                            presence, score_a) - 1) / 2.0
           END AS common_rank_a,
           CASE WHEN presence = 'both' THEN
             rank() OVER (PARTITION BY pt_model, ft_a, ft_b, query_id, method, damping_kind, damping, presence
                          ORDER BY score_b)
             + (count(*) OVER (PARTITION BY pt_model, ft_a, ft_b, query_id, method, damping_kind, damping,
                                            presence, score_b) - 1) / 2.0
           END AS common_rank_b
    FROM attribution_diff)
SELECT pt_model, ft_a, ft_b, query_id, method, damping_kind, damping,
       count(rank_a) AS n_a,
       count(rank_b) AS n_b,
       count(*) FILTER (WHERE presence = 'both') AS n_common,
       count(*) FILTER (WHERE presence = 'only_a') AS n_only_a,
       count(*) FILTER (WHERE presence = 'only_b') AS n_only_b,
       CASE WHEN count(*) FILTER (WHERE presence = 'both') >= 2
                 AND var_pop(common_rank_a) > 0 AND var_pop(common_rank_b) > 0
            THEN corr(common_rank_a, common_rank_b) END AS spearman,
       count(*) FILTER (WHERE rank_change > 0) AS n_rose,
       count(*) FILTER (WHERE rank_change < 0) AS n_fell,
       avg(abs(rank_change)) AS mean_abs_rank_change,
       count(*) FILTER (WHERE rank_a <= 10 AND rank_b <= 10) AS top10_overlap
FROM ranked
GROUP BY pt_model, ft_a, ft_b, query_id, method, damping_kind, damping;
