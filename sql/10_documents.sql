-- documents: one row per loaded corpus document (schema: msif_assets.lake.tables.DOCUMENTS).
-- Files: ${LAKE}/shards/<shard>/docs.parquet (the shard is stored in the file).
CREATE OR REPLACE VIEW documents AS
SELECT shard, doc_id, text, meta, source_file, source_line
FROM read_parquet('${LAKE}/shards/*/docs.parquet', union_by_name = true);
