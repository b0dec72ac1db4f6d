-- queries: prompts/completions whose sources we trace (tables.QUERIES).
CREATE OR REPLACE VIEW queries AS
SELECT query_id, prompt, completion, gold_doc_ids, meta, source_file, source_line
FROM read_parquet('${LAKE}/queries/queries.parquet', union_by_name = true);
