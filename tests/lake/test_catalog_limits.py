"""The catalog's sandbox: SQL reads only the lake's table directories, within a time and memory budget."""

from __future__ import annotations

import sqlite3
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msif_assets.app.cli import main
from msif_assets.lake.catalog import (
    DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT_S, TABLE_DIRS, Catalog, CatalogError, CatalogQueryError,
)

# range(1e11) (DuckDB 2.0 binds range() to a BIGINT only); hashing every row takes minutes.
FOREVER = "SELECT count(*) AS n FROM range(100000000000) WHERE hash(range) % 7 = 0"
MEMORY_HOG = "SELECT list(range) AS xs FROM range(20000000)"  # ~160 MB in one list


def _plant(folder):
    """A secret in every readable shape: CSV, Parquet, text."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secret.csv").write_text("secret\nhunter2\n")
    pq.write_table(pa.table({"secret": ["hunter2"]}), folder / "secret.parquet")
    return folder


@pytest.fixture
def secrets(small_lake, tmp_path, monkeypatch):
    """Real non-table files inside and outside the lake, keyed by how SQL would name their folder."""
    root = small_lake.root
    dagster = _plant(root / ".dagster")
    db = sqlite3.connect(dagster / "runs.db")
    db.execute("CREATE TABLE runs (run_id TEXT, config TEXT)")
    db.execute("INSERT INTO runs VALUES ('r1', 'token=hunter2')")
    db.commit()
    db.close()
    (root / ".automation_cursor").write_text('{"cursor": "hunter2"}')
    cwd = tmp_path / "cwd"
    _plant(cwd / ".tmp")
    monkeypatch.chdir(cwd)
    return {
        "dagster": str(dagster),
        "staging": str(_plant(root / ".staging" / "tmp-123")),
        "embeddings": str(_plant(root / "embeddings" / "chunks.lance" / "data")),
        "lake_root": str(_plant(root)),
        "outside": str(_plant(tmp_path / "outside")),
        "cwd_tmp": ".tmp",
        "cwd_tmp_abs": str(cwd / ".tmp"),
    }


READERS = {
    "read_blob": "SELECT content FROM read_blob('{d}/**')",
    "read_text": "SELECT content FROM read_text('{d}/secret.csv')",
    "read_csv": "SELECT * FROM read_csv('{d}/secret.csv')",
    "read_parquet": "SELECT * FROM read_parquet('{d}/secret.parquet')",
    "glob": "SELECT file FROM glob('{d}/**')",
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("where", ["dagster", "staging", "embeddings", "lake_root", "outside", "cwd_tmp", "cwd_tmp_abs"])
def test_sql_reads_nothing_but_the_lake_tables(secrets, small_lake, reader, where):
    with Catalog.open(small_lake.root) as catalog:
        with pytest.raises(CatalogQueryError, match=r"query refused: SQL may read only the lake's table "
                                                     r"directories \(shards/, .*\).*Permission"):
            catalog.query(READERS[reader].format(d=secrets[where]))
        # the views still read their files after the refusal
        assert catalog.query("SELECT count(*) AS n FROM documents")["n"][0].as_py() == 4


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_blob('{root}/.dagster/runs.db')",
    "SELECT * FROM read_text('{root}/.automation_cursor')",
    "SELECT * FROM read_blob('{root}/shards/../.dagster/runs.db')",
    "SELECT * FROM read_text('{root}/shards/s1/../../.automation_cursor')",
    "SELECT * FROM sqlite_scan('{root}/.dagster/runs.db', 'runs')",
    "SELECT * FROM read_text('file://{root}/.automation_cursor')",
    "SELECT * FROM read_text('/etc/hostname')",
])
def test_dagster_instance_and_traversal_are_refused(secrets, small_lake, sql):
    with Catalog.open(small_lake.root) as catalog:
        with pytest.raises(CatalogQueryError) as refused:
            catalog.query(sql.format(root=small_lake.root))
    assert "hunter2" not in str(refused.value)


def test_table_directories_stay_readable(secrets, small_lake):
    with Catalog.open(small_lake.root) as catalog:
        assert catalog.readable_dirs == [small_lake.root / d for d in TABLE_DIRS]
        rows = catalog.query(f"SELECT count(*) AS n FROM read_parquet('{small_lake.root}/chunks/*/part.parquet')")
        assert rows["n"][0].as_py() == 4
        for view in catalog.views:
            catalog.query(f"SELECT count(*) AS n FROM {view}")
        settings = catalog.query("SELECT current_setting('temp_directory') AS t, "
                                 "current_setting('enable_external_access') AS e").to_pylist()
        assert settings == [{"t": "", "e": False}]


def test_every_view_works_on_a_fresh_lake_after_lockdown(tmp_path):
    with Catalog.open(tmp_path / "fresh") as catalog:
        for view in catalog.views:
            assert catalog.query(f"SELECT count(*) AS n FROM {view}")["n"][0].as_py() == 0
        with pytest.raises(CatalogQueryError, match="Permission"):
            catalog.query(f"SELECT * FROM glob('{tmp_path}/**')")


def test_catalog_files_may_reference_only_table_directories(tmp_path):
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    for ref in ("${LAKE}/.dagster/runs.db", "${LAKE}/embeddings/x.parquet", "${LAKE}/*/x.parquet", "${LAKE}"):
        (sql_dir / "01_v.sql").write_text(f"CREATE OR REPLACE VIEW v AS SELECT * FROM read_text('{ref}');")
        with pytest.raises(CatalogError, match="only the lake's table directories"):
            Catalog.open(tmp_path / "lake", sql_dir)
    (sql_dir / "01_v.sql").write_text("CREATE OR REPLACE VIEW v AS SELECT 1 AS x;")
    with Catalog.open(tmp_path / "lake", sql_dir) as catalog:
        assert catalog.readable_dirs == []
        assert catalog.query("SELECT x FROM v").to_pylist() == [{"x": 1}]


# -- budgets ------------------------------------------------------------------------
def test_a_query_over_the_time_budget_is_interrupted(small_lake):
    with Catalog.open(small_lake.root, timeout_s=1) as catalog:
        start = time.monotonic()
        with pytest.raises(CatalogQueryError) as over:
            catalog.query(FOREVER)
        elapsed = time.monotonic() - start
        message = str(over.value)
        assert elapsed < 5, elapsed
        assert "\n" not in message
        assert "time budget of 1 s" in message and "--timeout" in message and "MSIF_SQL_TIMEOUT" in message
        # the connection is usable after the interrupt, and a fast query is not interrupted
        assert catalog.query("SELECT count(*) AS n FROM documents")["n"][0].as_py() == 4
        time.sleep(1.2)
        assert catalog.query("SELECT 1 AS x").to_pylist() == [{"x": 1}]


def test_time_budget_from_the_environment(small_lake, monkeypatch):
    monkeypatch.setenv("MSIF_SQL_TIMEOUT", "1.5")
    with Catalog.open(small_lake.root) as catalog:
        assert catalog.timeout_s == 1.5
        start = time.monotonic()
        with pytest.raises(CatalogQueryError, match=r"time budget of 1\.5 s"):
            catalog.query(FOREVER)
        assert time.monotonic() - start < 5


def test_a_query_over_the_memory_budget_fails_with_the_budget(small_lake):
    with Catalog.open(small_lake.root, memory_limit="64MB") as catalog:
        with pytest.raises(CatalogQueryError) as over:
            catalog.query(MEMORY_HOG)
        message = str(over.value)
        assert "\n" not in message
        assert "memory budget of 64MB" in message and "Out of Memory" in message
        assert "--memory-limit" in message and "MSIF_SQL_MEMORY_LIMIT" in message
        with pytest.raises(CatalogQueryError, match="memory budget of 64MB"):
            catalog.query("SELECT count(*) FROM (SELECT range AS r FROM range(20000000) ORDER BY hash(r))")
        assert catalog.query("SELECT count(*) AS n FROM documents")["n"][0].as_py() == 4
    with Catalog.open(small_lake.root, memory_limit="1GB") as catalog:  # a raised budget lets it through
        assert catalog.query(f"SELECT len(xs) AS n FROM ({MEMORY_HOG})")["n"][0].as_py() == 20000000


def test_budget_defaults_and_bad_values(small_lake, monkeypatch):
    monkeypatch.delenv("MSIF_SQL_TIMEOUT", raising=False)
    monkeypatch.delenv("MSIF_SQL_MEMORY_LIMIT", raising=False)
    with Catalog.open(small_lake.root) as catalog:
        assert (catalog.timeout_s, catalog.memory_limit) == (DEFAULT_TIMEOUT_S, DEFAULT_MEMORY_LIMIT)
        limit = catalog.query("SELECT current_setting('memory_limit') AS m")["m"][0].as_py()
        assert limit == "3.7 GiB"  # 4GB
    monkeypatch.setenv("MSIF_SQL_MEMORY_LIMIT", "256MB")
    with Catalog.open(small_lake.root) as catalog:
        assert catalog.query("SELECT current_setting('memory_limit') AS m")["m"][0].as_py() == "244.1 MiB"
    with Catalog.open(small_lake.root, memory_limit="512MB", timeout_s=0) as catalog:  # arguments win
        assert catalog.memory_limit == "512MB" and catalog.timeout_s == 0
    with pytest.raises(CatalogError, match="MSIF_SQL_MEMORY_LIMIT='lots' is not a DuckDB memory size"):
        monkeypatch.setenv("MSIF_SQL_MEMORY_LIMIT", "lots")
        Catalog.open(small_lake.root)
    with pytest.raises(CatalogError, match="memory_limit='1 bucket' is not a DuckDB memory size"):
        Catalog.open(small_lake.root, memory_limit="1 bucket")
    monkeypatch.setenv("MSIF_SQL_TIMEOUT", "soon")
    with pytest.raises(CatalogError, match="MSIF_SQL_TIMEOUT='soon' is not a number of seconds"):
        Catalog.open(small_lake.root, memory_limit="1GB")
    with pytest.raises(CatalogError, match="must be a finite number of seconds >= 0"):
        Catalog.open(small_lake.root, timeout_s=-1)


def test_cli_budget_options(small_lake, capsys):
    lake = ["--lake", str(small_lake.root)]
    start = time.monotonic()
    assert main(["sql", FOREVER, "--timeout", "1", *lake]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "time budget of 1 s" in err and "--timeout" in err
    assert main(["sql", MEMORY_HOG, "--memory-limit", "64MB", *lake]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "memory budget of 64MB" in err and "--memory-limit" in err
    assert main(["sql", "SELECT count(*) AS n FROM documents", "--timeout", "30", "--memory-limit", "1GB",
                 "--format", "csv", *lake]) == 0
    assert capsys.readouterr().out.split() == ["n", "4"]
    assert main(["top", "q1", "--k", "1", "--timeout", "30", "--memory-limit", "1GB", *lake]) == 0


def test_cli_refuses_the_dagster_instance(secrets, small_lake, capsys):
    code = main(["sql", f"SELECT * FROM read_blob('{small_lake.root}/.dagster/**')", "--lake", str(small_lake.root)])
    assert code == 2
    err = capsys.readouterr().err
    assert "may read only the lake's table directories" in err and "hunter2" not in err
