-- fact_tracing_summary: the fact-tracing means of eval_summary (written by the
-- fact_tracing_eval asset) with the protocol as a column. protocol: 'full' ranks every
-- scored document of a query, 'rerank' its Akyürek et al. pool (gold ∪ BM25 top-100 ∪ 100
-- same-answer ∪ 100 random). metric: mrr, recall_any_at_10, recall_frac_at_10,
-- mean_candidates. Per-query rows: eval/fact_tracing_<protocol>.parquet.
CREATE OR REPLACE VIEW fact_tracing_summary AS
SELECT split_part(metric, '/', 1) AS protocol, method, damping_kind, damping,
       split_part(metric, '/', 2) AS metric, value, n_queries, ft_model, computed_at
FROM eval_summary
WHERE split_part(metric, '/', 1) IN ('full', 'rerank');
