-- The counterfactual evaluation (`msif validate`; tables.COUNTERFACTUAL_TABLES, written by the
-- counterfactual assets): retrain without each method's top-k documents, and on random subsets.
--   counterfactual_removals  per removal run and query: the documents removed (rank, score); a run
--                            removes the union over its queries
--   lds_subsets              per LDS subset: the documents kept
--   counterfactual_outputs   per removal/baseline/reseed run and query: log p(answer | prompt), greedy answer
--   lds_outputs              the same for the LDS runs (and their reseeds)
--   counterfactual_summary   per run: mean Δ log p vs the `none` retrain with bootstrap CI, flip rate, …
--   lds_summary, lds_per_query   LDS per method (mean Spearman over queries, CI) and per query;
--                            method 'reseed' = the noise ceiling (two seeds, same subsets)
CREATE OR REPLACE VIEW counterfactual_removals AS
SELECT * FROM read_parquet('${LAKE}/eval/counterfactual_removals.parquet', union_by_name = true);

CREATE OR REPLACE VIEW lds_subsets AS
SELECT * FROM read_parquet('${LAKE}/eval/lds_subsets.parquet', union_by_name = true);

CREATE OR REPLACE VIEW counterfactual_outputs AS
SELECT * FROM read_parquet('${LAKE}/eval/counterfactual_outputs.parquet', union_by_name = true);

CREATE OR REPLACE VIEW lds_outputs AS
SELECT * FROM read_parquet('${LAKE}/eval/lds_outputs.parquet', union_by_name = true);

CREATE OR REPLACE VIEW counterfactual_summary AS
SELECT * FROM read_parquet('${LAKE}/eval/counterfactual_summary.parquet', union_by_name = true);

CREATE OR REPLACE VIEW lds_summary AS
SELECT * FROM read_parquet('${LAKE}/eval/lds_summary.parquet', union_by_name = true);

CREATE OR REPLACE VIEW lds_per_query AS
SELECT * FROM read_parquet('${LAKE}/eval/lds_per_query.parquet', union_by_name = true);

-- eval_counterfactual: one row per removal (method × damping × k, gold) and per reference run
-- (`none` = nothing removed; `reseed` = nothing removed, another seed: the noise floor).
-- delta = log p(answer | prompt) under the run's fine-tuned model minus under the `none` retrain.
CREATE OR REPLACE VIEW eval_counterfactual AS
SELECT CASE WHEN kind = 'reseed' THEN 'none (seed ' || CAST(seed AS VARCHAR) || ')'
            WHEN damping IS NULL THEN method
            ELSE method || '@' || CASE damping_kind WHEN 'relative' THEN 'rel:' ELSE 'abs:' END || CAST(damping AS VARCHAR)
       END AS label,
       kind, method, damping_kind, damping, k, seed, n_removed, n_queries,
       mean_delta_logp, delta_ci_lo, delta_ci_hi, mean_abs_delta_logp, frac_logp_down,
       flip_rate, flip_ci_lo, flip_ci_hi, accuracy, train_seconds, run_key, ft_model, args
FROM counterfactual_summary
ORDER BY CASE kind WHEN 'baseline' THEN 0 WHEN 'reseed' THEN 1 ELSE 2 END, method = 'gold' DESC, method,
         damping_kind NULLS FIRST, damping NULLS FIRST, k NULLS FIRST;

-- eval_lds: LDS per method and damping (mean over queries of the Spearman correlation between
-- measured log p and the summed scores over each subset); bootstrap CIs over queries (ci_lo/hi)
-- and over subsets (ci_lo_subsets/hi_subsets: the subsets are one draw shared by every query);
-- the 'reseed' rows are the retraining-noise ceiling.
CREATE OR REPLACE VIEW eval_lds AS
SELECT CASE WHEN method = 'reseed' THEN 'reseed (seed ' || CAST(seed AS VARCHAR) || ')'
            WHEN damping IS NULL THEN method
            ELSE method || '@' || CASE damping_kind WHEN 'relative' THEN 'rel:' ELSE 'abs:' END || CAST(damping AS VARCHAR)
       END AS label,
       method, damping_kind, damping, seed, lds, ci_lo, ci_hi, ci_lo_subsets, ci_hi_subsets, n_queries, n_subsets,
       alpha, ft_model, args
FROM lds_summary
ORDER BY method = 'reseed', method, damping_kind NULLS FIRST, damping NULLS FIRST;

-- counterfactual_deltas: per removal/reseed run and query, the change against the `none` retrain.
CREATE OR REPLACE VIEW counterfactual_deltas AS
SELECT o.run_key, o.kind, o.method, o.damping_kind, o.damping, o.k, o.seed, o.query_id,
       o.logp - b.logp AS delta_logp, o.greedy, b.greedy AS none_greedy, o.greedy <> b.greedy AS flipped,
       o.correct, o.logp, b.logp AS none_logp
FROM counterfactual_outputs AS o
JOIN counterfactual_outputs AS b ON b.kind = 'baseline' AND b.query_id = o.query_id
WHERE o.kind <> 'baseline';
