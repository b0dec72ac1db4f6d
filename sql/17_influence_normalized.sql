-- influence_normalized: `influence` plus scale-free columns for reading scores. Raw scores
-- depend on the model, the damping and the method, so compare these instead. Per
-- (ft_model, pt_model, query, method, damping), the partition `rank` uses:
--   n_scored    candidates scored for the query in that partition
--   share       score / Σ|score| over them (signed; Σ|share| = 1; NULL if every score is 0)
--   percentile  rank-based, 1.0 = rank 1, 0.0 = last: the fraction of the other
--               candidates this chunk outranks, (n_scored - rank) / (n_scored - 1)
CREATE OR REPLACE VIEW influence_normalized AS
SELECT *,
       score / nullif(sum(abs(score)) OVER w, 0) AS share,
       CASE WHEN n_scored = 1 THEN 1.0
            ELSE CAST(n_scored - rank AS DOUBLE) / (n_scored - 1) END AS percentile
FROM (SELECT *, count(*) OVER w AS n_scored
      FROM influence
      WINDOW w AS (PARTITION BY ft_model, pt_model, query_id, method, damping_kind, damping))
WINDOW w AS (PARTITION BY ft_model, pt_model, query_id, method, damping_kind, damping);
