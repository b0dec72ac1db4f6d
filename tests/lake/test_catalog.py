import pyarrow as pa
import pytest

from msif_assets.lake.catalog import BASE_VIEWS, Catalog, CatalogError, CatalogQueryError
from msif_assets.lake.tables import write_chunks, write_eval, write_rejects

from .lake_data import FT, NOW, PT, SHARD_SCORES, SHARD_TEXTS, chunks_table

EXPECTED_VIEWS = {"documents", "chunks", "queries", "candidates", "influence", "influence_with_text",
                  "top_k", "mlp_attn_share", "shard_summary", "rejects", "eval_summary",
                  "eval_fidelity", "influence_normalized", "query_summary", "fact_tracing_full",
                  "fact_tracing_rerank"}


def test_empty_lake_has_every_view_typed_and_empty(tmp_path):
    with Catalog.open(tmp_path / "nothing-here") as catalog:
        assert EXPECTED_VIEWS <= set(catalog.views)
        assert set(catalog.empty_views) == set(BASE_VIEWS)
        for view in EXPECTED_VIEWS:
            assert catalog.query(f"SELECT count(*) AS n FROM {view}").column("n")[0].as_py() == 0
        types = {r["column_name"]: r["column_type"] for r in catalog.query("DESCRIBE influence").to_pylist()}
        assert types["score"] == "DOUBLE" and types["rank"] == "INTEGER"
        assert types["computed_at"] == "TIMESTAMP WITH TIME ZONE"


def test_base_views_on_files_have_the_same_columns_as_their_empty_form(small_lake, tmp_path):
    with Catalog.open(small_lake.root) as full, Catalog.open(tmp_path / "empty") as empty:
        for view in ("documents", "chunks", "queries", "influence"):
            assert view not in full.empty_views
            full_cols = full.query(f"DESCRIBE {view}").to_pylist()
            empty_cols = empty.query(f"DESCRIBE {view}").to_pylist()
            assert [(c["column_name"], c["column_type"]) for c in full_cols] == \
                   [(c["column_name"], c["column_type"]) for c in empty_cols]


def test_views_over_written_tables(small_lake):
    with Catalog.open(small_lake.root) as catalog:
        assert catalog.query("SELECT count(*) AS n FROM documents")["n"][0].as_py() == 4
        top = catalog.query("SELECT doc_id, rank, chunk_text, prompt, shard FROM top_k "
                            "WHERE query_id = 'q1' ORDER BY rank").to_pylist()
        # rank is global across both shard partitions
        expected = sorted(((d, s) for sc in SHARD_SCORES.values() for d, s in sc.items()), key=lambda x: -x[1])
        assert [r["doc_id"] for r in top] == [d for d, _ in expected]
        assert [r["rank"] for r in top] == [1, 2, 3, 4]
        assert top[0]["chunk_text"] == SHARD_TEXTS["s1"]["d1"]
        assert top[0]["prompt"] == "The capital of France is" and top[0]["shard"] == "s1"
        share = catalog.query("SELECT mlp_share, attn_share, n_chunks, ft_model, pt_model FROM mlp_attn_share")
        assert share.to_pylist() == [{"mlp_share": pytest.approx(0.75), "attn_share": pytest.approx(0.25),
                                      "n_chunks": 4, "ft_model": FT, "pt_model": PT}]
        summary = catalog.query("SELECT shard, n_docs, n_chunks, n_scores, n_rejects FROM shard_summary")
        assert summary.to_pylist() == [
            {"shard": "s1", "n_docs": 2, "n_chunks": 2, "n_scores": 2, "n_rejects": 0},
            {"shard": "s2", "n_docs": 2, "n_chunks": 2, "n_scores": 2, "n_rejects": 0},
        ]


def test_numeric_looking_shard_keys_stay_strings(layout):
    write_chunks(layout, "007", chunks_table("007", {"a": "one two"}))
    with Catalog.open(layout.root) as catalog:
        assert catalog.query("SELECT shard FROM chunks").to_pylist() == [{"shard": "007"}]


def test_rejects_and_eval_views(layout):
    write_rejects(layout, "corpus-s7", pa.table({
        "source": ["corpus-s7"], "file": ["x.jsonl"], "line": [3], "field": ["text"],
        "reason": ["missing field"], "raw": ["{}"]}))
    write_eval(layout, "eval_summary", pa.Table.from_pylist([{
        "method": "ms-if", "damping": 0.1, "damping_kind": "relative", "metric": "mrr", "value": 0.5,
        "n_queries": 2, "ft_model": FT, "computed_at": NOW}]))
    with Catalog.open(layout.root) as catalog:
        assert catalog.query("SELECT source, line, field FROM rejects").to_pylist() == [
            {"source": "corpus-s7", "line": 3, "field": "text"}]
        assert catalog.query("SELECT shard, n_rejects FROM shard_summary").to_pylist() == [
            {"shard": "s7", "n_rejects": 1}]
        assert catalog.query("SELECT value FROM eval_summary")["value"][0].as_py() == 0.5


@pytest.mark.parametrize("sql", [
    "INSERT INTO documents VALUES ('a')",
    "CREATE TABLE t AS SELECT 1",
    "CREATE OR REPLACE VIEW documents AS SELECT 1",
    "COPY (SELECT 1) TO 'out.csv'",
    "ATTACH 'other.duckdb' AS o",
    "DROP VIEW documents",
    "UPDATE documents SET text = ''",
    "DELETE FROM documents",
    "SET enable_external_access = true",
    "PRAGMA version",
    "INSTALL httpfs",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO 'out.csv'",
    "SELECT 1; DROP VIEW documents",
])
def test_read_only_guard_refuses_writes(small_lake, sql):
    with Catalog.open(small_lake.root) as catalog:
        with pytest.raises(CatalogQueryError):
            catalog.query(sql)
        assert catalog.query("SELECT count(*) AS n FROM documents")["n"][0].as_py() == 4
    assert not (small_lake.root / "out.csv").exists()


@pytest.mark.parametrize("sql", [
    "SELECT 1 AS x",
    "WITH t AS (SELECT 2 AS x) SELECT x FROM t",
    "FROM documents LIMIT 1",
    "DESCRIBE documents",
    "SHOW TABLES",
    "SUMMARIZE documents",
    "EXPLAIN SELECT * FROM influence",
])
def test_read_only_guard_allows_reads(small_lake, sql):
    with Catalog.open(small_lake.root) as catalog:
        assert catalog.query(sql).num_rows >= 1


def test_files_outside_the_lake_are_not_readable(small_lake, tmp_path):
    outside = tmp_path / "secret.csv"
    outside.write_text("a\n1\n")
    with Catalog.open(small_lake.root) as catalog:
        with pytest.raises(CatalogQueryError, match="Permission"):
            catalog.query(f"SELECT * FROM read_csv('{outside}')")


def test_named_parameters(small_lake):
    with Catalog.open(small_lake.root) as catalog:
        rows = catalog.query("SELECT doc_id FROM documents WHERE shard = $s ORDER BY doc_id", {"s": "s2"})
        assert rows.column("doc_id").to_pylist() == ["d3", "d4"]


def test_sql_files_may_only_create_views(tmp_path):
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    (sql_dir / "01_bad.sql").write_text("CREATE TABLE t AS SELECT 1;")
    with pytest.raises(CatalogError, match="only 'CREATE OR REPLACE VIEW"):
        Catalog.open(tmp_path / "lake", sql_dir)
    (sql_dir / "01_bad.sql").write_text("CREATE OR REPLACE VIEW v AS SELECT '${OTHER}' AS x;")
    with pytest.raises(CatalogError, match="unknown placeholder"):
        Catalog.open(tmp_path / "lake", sql_dir)
