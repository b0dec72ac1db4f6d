"""The DuckDB catalog: views from ``sql/*.sql`` over the lake's Parquet, queried read-only.

``Catalog.open(lake_root)`` builds an in-memory DuckDB (no ``.duckdb`` file is ever
held open, so writers are never locked out), runs every ``sql/*.sql`` file in name
order with ``${LAKE}`` replaced by the lake root, and then locks the connection down:
file access is limited to the lake directory and the configuration is frozen.

SQL files may contain only ``CREATE OR REPLACE VIEW <name> AS ...`` statements. A
base view whose Parquet files do not exist yet (a fresh lake) becomes an empty view
with the declared column types (BASE_VIEWS), so dependent views and queries still work.

``Catalog.query(sql)`` accepts exactly one read-only statement — SELECT / WITH /
FROM / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN of a SELECT — checked with DuckDB's own
parser (``extract_statements``); anything else raises CatalogQueryError.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from msif_assets.lake.layout import LakeLayout
from msif_assets.lake.tables import (
    FACT_TRACING_POOLS, INFLUENCE_SHARE, PARAM_PROXIMITY,
    CANDIDATES, CHUNKS, DOCUMENTS, EVAL_FIDELITY, EVAL_RANKING, EVAL_SUMMARY, QUERIES, REJECTS,
    SCORES, TableSpec,
)

__all__ = ["Catalog", "CatalogError", "CatalogQueryError", "BASE_VIEWS", "default_sql_dir"]

ENV_SQL_DIR = "MSIF_SQL_DIR"
BASE_VIEWS: dict[str, TableSpec] = {
    "documents": DOCUMENTS, "chunks": CHUNKS, "queries": QUERIES, "candidates": CANDIDATES,
    "influence": SCORES, "rejects": REJECTS, "eval_ranking": EVAL_RANKING,
    "eval_summary": EVAL_SUMMARY, "eval_fidelity": EVAL_FIDELITY,
    "fact_tracing_full": EVAL_RANKING, "fact_tracing_rerank": EVAL_RANKING, "fact_tracing_pools": FACT_TRACING_POOLS,
    "param_proximity": PARAM_PROXIMITY, "influence_share": INFLUENCE_SHARE,
}
_VIEW_RE = re.compile(r"^\s*(?:--[^\n]*\n\s*)*CREATE\s+OR\s+REPLACE\s+VIEW\s+([A-Za-z_][A-Za-z0-9_]*)\s+AS\b",
                      re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"\$\{[^}]*\}")


class CatalogError(RuntimeError):
    """A catalog SQL file is invalid or failed to run."""


class CatalogQueryError(ValueError):
    """A query was refused (not read-only) or failed."""


def default_sql_dir() -> Path:
    """``$MSIF_SQL_DIR`` or the repository's ``sql/`` folder."""
    override = os.environ.get(ENV_SQL_DIR)
    return Path(override) if override else Path(__file__).resolve().parents[2] / "sql"


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _duck_type(t.value_type) + "[]"
    simple = {pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT",
              pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}
    if t in simple:
        return simple[t]
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    raise CatalogError(f"no DuckDB type mapping for Arrow type {t}")


def _empty_view_sql(name: str, schema: pa.Schema) -> str:
    cols = ", ".join(f'CAST(NULL AS {_duck_type(f.type)}) AS "{f.name}"' for f in schema)
    return f"CREATE OR REPLACE VIEW {name} AS SELECT {cols} WHERE false"


def _sql_literal_path(path: Path) -> str:
    return path.as_posix().replace("'", "''")


@dataclass
class Catalog:
    """An in-memory DuckDB with the lake's views; use ``Catalog.open``."""

    lake_root: Path
    connection: Any
    views: list[str] = field(default_factory=list)
    empty_views: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, lake_root: str | os.PathLike[str], sql_dir: str | os.PathLike[str] | None = None) -> "Catalog":
        layout = LakeLayout(lake_root)
        sql_path = Path(sql_dir) if sql_dir is not None else default_sql_dir()
        files = sorted(sql_path.glob("*.sql"))
        if not files:
            raise CatalogError(f"no *.sql files in {sql_path}; set {ENV_SQL_DIR} to the catalog folder")
        con = duckdb.connect(":memory:")
        catalog = cls(lake_root=layout.root, connection=con)
        try:
            for file in files:
                catalog._run_file(file, _sql_literal_path(layout.root))
            # Defence in depth behind the statement guard: only the lake is readable.
            allowed = _sql_literal_path(layout.root).rstrip("/") + "/"
            con.execute(f"SET allowed_directories = ['{allowed}']")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except BaseException:
            con.close()
            raise
        return catalog

    def _run_file(self, file: Path, lake_literal: str) -> None:
        text = file.read_text(encoding="utf-8").replace("${LAKE}", lake_literal)
        leftover = _PLACEHOLDER_RE.search(text)
        if leftover:
            raise CatalogError(f"{file}: unknown placeholder {leftover.group(0)}; only ${{LAKE}} is defined")
        try:
            statements = self.connection.extract_statements(text)
        except duckdb.Error as exc:
            raise CatalogError(f"{file}: cannot parse: {exc}") from exc
        for statement in statements:
            match = _VIEW_RE.match(statement.query)
            if statement.type != duckdb.StatementType.CREATE or match is None:
                raise CatalogError(f"{file}: only 'CREATE OR REPLACE VIEW <name> AS ...' statements are "
                                   f"allowed in catalog files, found: {statement.query.strip()[:80]!r}")
            name = match.group(1)
            try:
                self.connection.execute(statement.query)
            except duckdb.IOException as exc:
                if "No files found" not in str(exc) or name not in BASE_VIEWS:
                    raise CatalogError(f"{file}: view {name}: {exc}") from exc
                self.connection.execute(_empty_view_sql(name, BASE_VIEWS[name].schema))
                self.empty_views.append(name)
            except duckdb.Error as exc:
                raise CatalogError(f"{file}: view {name}: {exc}") from exc
            self.views.append(name)

    def _check_read_only(self, sql: str) -> str:
        try:
            statements = self.connection.extract_statements(sql)
        except duckdb.Error as exc:
            raise CatalogQueryError(f"cannot parse query: {exc}") from exc
        if len(statements) != 1:
            raise CatalogQueryError(f"expected exactly one SQL statement, got {len(statements)}")
        statement = statements[0]
        kind = statement.type
        if kind == duckdb.StatementType.EXPLAIN:
            inner = re.sub(r"^\s*EXPLAIN\s+(ANALYZE\s+)?", "", statement.query, flags=re.IGNORECASE)
            try:
                inner_statements = self.connection.extract_statements(inner) if inner != statement.query else []
            except duckdb.Error:
                inner_statements = []
            if len(inner_statements) == 1 and inner_statements[0].type == duckdb.StatementType.SELECT:
                return statement.query
            raise CatalogQueryError("the catalog is read-only: EXPLAIN is allowed only for a SELECT query")
        if kind != duckdb.StatementType.SELECT:
            raise CatalogQueryError(
                f"the catalog is read-only: {kind.name} statements are refused; use "
                "SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN. Writes go through the pipeline "
                "(msif materialize), never through SQL."
            )
        return statement.query

    def query(self, sql: str, params: list[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run one read-only statement and return its rows as an Arrow table."""
        statement = self._check_read_only(sql)
        try:
            relation = self.connection.sql(statement, params=params)
            return pa.table({}) if relation is None else relation.to_arrow_table()
        except duckdb.Error as exc:
            raise CatalogQueryError(f"query failed: {exc}") from exc

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
