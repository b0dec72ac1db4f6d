-- fact_tracing: fact-tracing means per protocol, method and damping, one row each (a pivot
-- of eval_summary, written by the fact_tracing_eval asset). protocol: 'full' ranks every
-- scored document of a query, 'rerank' its Akyürek et al. pool (gold ∪ BM25 top-100 ∪ 100
-- same-answer ∪ 100 random). mean_candidates: documents ranked per query (pool size).
-- Per-query rows: eval/fact_tracing_<protocol>.parquet; pools: eval/fact_tracing_pools.parquet.
CREATE OR REPLACE VIEW fact_tracing AS
SELECT split_part(metric, '/', 1) AS protocol, method, damping_kind, damping,
       max(value) FILTER (WHERE split_part(metric, '/', 2) = 'mrr') AS mrr,
       max(value) FILTER (WHERE split_part(metric, '/', 2) = 'recall_any_at_10') AS recall_any_at_10,
       max(value) FILTER (WHERE split_part(metric, '/', 2) = 'recall_frac_at_10') AS recall_frac_at_10,
       max(value) FILTER (WHERE split_part(metric, '/', 2) = 'mean_candidates') AS mean_candidates,
       max(n_queries) AS n_queries, ft_model
FROM eval_summary
WHERE split_part(metric, '/', 1) IN ('full', 'rerank')
GROUP BY ALL;

-- Per-query fact-tracing rows per protocol (tables.FACT_TRACING_FULL / FACT_TRACING_RERANK),
-- rerank pool composition, weight proximity and MLP/attention influence shares (written by
-- the evaluation assets).
CREATE OR REPLACE VIEW fact_tracing_full AS
SELECT * FROM read_parquet('${LAKE}/eval/fact_tracing_full.parquet', union_by_name = true);

CREATE OR REPLACE VIEW fact_tracing_rerank AS
SELECT * FROM read_parquet('${LAKE}/eval/fact_tracing_rerank.parquet', union_by_name = true);

CREATE OR REPLACE VIEW fact_tracing_pools AS
SELECT * FROM read_parquet('${LAKE}/eval/fact_tracing_pools.parquet', union_by_name = true);

CREATE OR REPLACE VIEW param_proximity AS
SELECT * FROM read_parquet('${LAKE}/eval/param_proximity.parquet', union_by_name = true);

CREATE OR REPLACE VIEW influence_share AS
SELECT * FROM read_parquet('${LAKE}/eval/influence_share.parquet', union_by_name = true);
