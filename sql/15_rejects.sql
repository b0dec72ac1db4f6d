-- rejects: input rows that were not loaded, with file, line, field and reason (tables.REJECTS).
-- Files: ${LAKE}/rejects/source=<source>/part.parquet (corpus shards use source "corpus-<shard>").
CREATE OR REPLACE VIEW rejects AS
SELECT source, file, line, field, reason, raw
FROM read_parquet('${LAKE}/rejects/*/part.parquet',
                  hive_partitioning = true, hive_types_autocast = false, union_by_name = true);
