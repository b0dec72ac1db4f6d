-- Evaluation tables (tables.EVAL_SUMMARY, EVAL_FIDELITY), one file each. The per-query
-- fact-tracing rows are fact_tracing_full / fact_tracing_rerank (24_eval_views.sql).
CREATE OR REPLACE VIEW eval_summary AS
SELECT method, damping, damping_kind, metric, value, n_queries, ft_model, computed_at
FROM read_parquet('${LAKE}/eval/eval_summary.parquet', union_by_name = true);

CREATE OR REPLACE VIEW eval_fidelity AS
SELECT method, reference, damping, spearman, pearson, n_pairs, seconds, model, computed_at
FROM read_parquet('${LAKE}/eval/eval_fidelity.parquet', union_by_name = true);
