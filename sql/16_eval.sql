-- Evaluation tables (tables.EVAL_RANKING, EVAL_SUMMARY, EVAL_FIDELITY), one file each.
CREATE OR REPLACE VIEW eval_ranking AS
SELECT query_id, method, damping, damping_kind, n_candidates, n_gold, first_gold_rank,
       reciprocal_rank, recall_any_at_10, recall_frac_at_10, ft_model, computed_at
FROM read_parquet('${LAKE}/eval/eval_ranking.parquet', union_by_name = true);

CREATE OR REPLACE VIEW eval_summary AS
SELECT method, damping, damping_kind, metric, value, n_queries, ft_model, computed_at
FROM read_parquet('${LAKE}/eval/eval_summary.parquet', union_by_name = true);

CREATE OR REPLACE VIEW eval_fidelity AS
SELECT method, reference, damping, spearman, pearson, n_pairs, seconds, model, computed_at
FROM read_parquet('${LAKE}/eval/eval_fidelity.parquet', union_by_name = true);
