-- mlp_attn_share: how much of each query's influence flows through MLP vs attention
-- parameters (shares of absolute per-chunk contributions, summed over candidates).
CREATE OR REPLACE VIEW mlp_attn_share AS
SELECT ft_model, pt_model, query_id, method, damping_kind, damping,
       count(*) AS n_chunks,
       sum(score) AS total_score,
       sum(score_mlp) AS total_mlp,
       sum(score_attn) AS total_attn,
       sum(abs(score_mlp)) / nullif(sum(abs(score_mlp)) + sum(abs(score_attn)), 0) AS mlp_share,
       sum(abs(score_attn)) / nullif(sum(abs(score_mlp)) + sum(abs(score_attn)), 0) AS attn_share
FROM influence
WHERE score_mlp IS NOT NULL AND score_attn IS NOT NULL
GROUP BY ALL;
