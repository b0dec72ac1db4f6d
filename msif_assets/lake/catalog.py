"""The DuckDB catalog: views from ``sql/*.sql`` over the lake's Parquet, queried read-only.

``Catalog.open(lake_root)`` builds an in-memory DuckDB (no ``.duckdb`` file is ever
held open, so writers are never locked out), runs every ``sql/*.sql`` file in name
order with ``${LAKE}`` replaced by the lake root, and then locks the connection down:
DuckDB may read only the table directories the views use (TABLE_DIRS: shards/, chunks/,
queries/, candidates/, scores/, rejects/, eval/) — never the lake's Dagster instance
(``.dagster/``), staging dirs, cursors, LanceDB files (``embeddings/``) or anything outside
the lake — nothing spills to a temp directory, and the configuration is frozen.

Every query runs under a memory budget (DuckDB ``memory_limit``; default
DEFAULT_MEMORY_LIMIT, ``$MSIF_SQL_MEMORY_LIMIT`` or ``Catalog.open(memory_limit=...)``)
and a time budget (default DEFAULT_TIMEOUT_S seconds, ``$MSIF_SQL_TIMEOUT`` or
``Catalog.open(timeout_s=...)``; 0 disables it): a query over budget is interrupted and
raises CatalogQueryError saying which budget it hit and how to raise it.

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
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from msif_assets.lake.layout import LakeLayout
from msif_assets.lake.storage import LakePath, is_remote, register_with_duckdb, require_bucket
from msif_assets.lake.tables import (
    FACT_TRACING_FULL, FACT_TRACING_POOLS, FACT_TRACING_RERANK, INFLUENCE_SHARE, PARAM_PROXIMITY,
    CANDIDATES, CHUNKS, DOCUMENTS, EVAL_FIDELITY, EVAL_SUMMARY, QUERIES, REJECTS,
    SCORES, TableSpec,
)
from msif_assets.lake.tables import COUNTERFACTUAL_TABLES

__all__ = ["Catalog", "CatalogError", "CatalogQueryError", "BASE_VIEWS", "TABLE_DIRS", "default_sql_dir",
           "DEFAULT_TIMEOUT_S", "DEFAULT_MEMORY_LIMIT"]

ENV_SQL_DIR = "MSIF_SQL_DIR"
ENV_TIMEOUT = "MSIF_SQL_TIMEOUT"
ENV_MEMORY_LIMIT = "MSIF_SQL_MEMORY_LIMIT"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MEMORY_LIMIT = "4GB"
# The only lake directories SQL may read: the Parquet tables of LakeLayout. Catalog files
# may reference ``${LAKE}/<dir>/...`` for these alone; DuckDB's allowed_directories is the
# subset the views actually use.
TABLE_DIRS = ("shards", "chunks", "queries", "candidates", "scores", "rejects", "eval")
BASE_VIEWS: dict[str, TableSpec] = {
    "documents": DOCUMENTS, "chunks": CHUNKS, "queries": QUERIES, "candidates": CANDIDATES,
    "influence": SCORES, "rejects": REJECTS,
    "eval_summary": EVAL_SUMMARY, "eval_fidelity": EVAL_FIDELITY,
    "fact_tracing_full": FACT_TRACING_FULL, "fact_tracing_rerank": FACT_TRACING_RERANK,
    "fact_tracing_pools": FACT_TRACING_POOLS,
    "param_proximity": PARAM_PROXIMITY, "influence_share": INFLUENCE_SHARE,
    **COUNTERFACTUAL_TABLES,  # sql/27_counterfactual.sql
}
_VIEW_RE = re.compile(r"^\s*(?:--[^\n]*\n\s*)*CREATE\s+OR\s+REPLACE\s+VIEW\s+([A-Za-z_][A-Za-z0-9_]*)\s+AS\b",
                      re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"\$\{[^}]*\}")
_LAKE_REF_RE = re.compile(r"\$\{LAKE\}(?:/([^/'\"]*))?")


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


def _sql_literal_path(path: LakePath) -> str:
    return (str(path) if is_remote(path) else path.as_posix()).replace("'", "''")


def _resolve_timeout(timeout_s: float | None) -> float:
    source = "timeout_s"
    if timeout_s is None:
        raw = os.environ.get(ENV_TIMEOUT)
        if raw is None or not raw.strip():
            return DEFAULT_TIMEOUT_S
        source = f"${ENV_TIMEOUT}"
        try:
            timeout_s = float(raw)
        except ValueError:
            raise CatalogError(f"{source}={raw!r} is not a number of seconds (0 disables the SQL time budget)") from None
    if not timeout_s >= 0 or timeout_s == float("inf"):
        raise CatalogError(f"{source}={timeout_s!r}: the SQL time budget must be a finite number of seconds >= 0 "
                           "(0 disables it)")
    return float(timeout_s)


def _resolve_memory_limit(memory_limit: str | None) -> tuple[str, str]:
    if memory_limit is not None:
        return str(memory_limit).strip(), "memory_limit"
    raw = os.environ.get(ENV_MEMORY_LIMIT)
    if raw is None or not raw.strip():
        return DEFAULT_MEMORY_LIMIT, "the default"
    return raw.strip(), f"${ENV_MEMORY_LIMIT}"


_RAISE_TIMEOUT = (f"raise it with `msif sql --timeout SECONDS`, ${ENV_TIMEOUT} or Catalog.open(timeout_s=...) "
                  "(0 disables it)")
_RAISE_MEMORY = (f"raise it with `msif sql --memory-limit SIZE` (e.g. 16GB), ${ENV_MEMORY_LIMIT} or "
                 "Catalog.open(memory_limit=...)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Deadline:
    """Interrupts a DuckDB connection if the query is still running after ``seconds``."""

    def __init__(self, connection: Any, seconds: float) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._running = True
        self.fired = False
        self._timer = threading.Timer(seconds, self._interrupt) if seconds > 0 else None
        if self._timer is not None:
            self._timer.daemon = True

    def _interrupt(self) -> None:
        with self._lock:
            if self._running:
                self.fired = True
                self._connection.interrupt()

    def __enter__(self) -> "_Deadline":
        if self._timer is not None:
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._running = False
        if self._timer is not None:
            self._timer.cancel()


@dataclass
class Catalog:
    """An in-memory DuckDB with the lake's views; use ``Catalog.open``."""

    lake_root: LakePath
    connection: Any
    views: list[str] = field(default_factory=list)
    empty_views: list[str] = field(default_factory=list)
    readable_dirs: list[LakePath] = field(default_factory=list)
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_limit: str = DEFAULT_MEMORY_LIMIT

    @classmethod
    def open(cls, lake_root: str | os.PathLike[str], sql_dir: str | os.PathLike[str] | None = None, *,
             timeout_s: float | None = None, memory_limit: str | None = None) -> "Catalog":
        """Build the catalog. ``timeout_s`` (seconds, 0 = none) and ``memory_limit`` (a DuckDB
        size such as ``"4GB"``) default to ``$MSIF_SQL_TIMEOUT`` / ``$MSIF_SQL_MEMORY_LIMIT``,
        else DEFAULT_TIMEOUT_S / DEFAULT_MEMORY_LIMIT."""
        layout = LakeLayout(lake_root)
        timeout = _resolve_timeout(timeout_s)
        memory, memory_source = _resolve_memory_limit(memory_limit)
        sql_path = Path(sql_dir) if sql_dir is not None else default_sql_dir()
        files = sorted(sql_path.glob("*.sql"))
        if not files:
            raise CatalogError(f"no *.sql files in {sql_path}; set {ENV_SQL_DIR} to the catalog folder")
        require_bucket(layout.root)
        con = duckdb.connect(":memory:")
        register_with_duckdb(con, layout.root)  # an object-store lake is read through its fsspec filesystem
        catalog = cls(lake_root=layout.root, connection=con, timeout_s=timeout, memory_limit=memory)
        try:
            try:
                con.execute("SET memory_limit = ?", [memory])
            except duckdb.Error as exc:
                raise CatalogError(f"{memory_source}={memory!r} is not a DuckDB memory size (e.g. 4GB, 512MB): "
                                   f"{_first_line(exc)}") from exc
            # No spilling: an in-memory catalog with no temp directory fails at memory_limit
            # instead of writing (and then being allowed to read) files outside the lake.
            con.execute("SET temp_directory = ''")
            con.execute("SET max_temp_directory_size = '0B'")
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("SET autoload_known_extensions = false")
            used_dirs: set[str] = set()
            for file in files:
                used_dirs |= catalog._run_file(file, _sql_literal_path(layout.root))
            # Defence in depth behind the statement guard: DuckDB may read only the table
            # directories the views use. Views read their files at query time, so these
            # stay allowed; everything else in (and outside) the lake is refused.
            catalog.readable_dirs = [layout.root / name for name in TABLE_DIRS if name in used_dirs]
            allowed = ", ".join(f"'{_sql_literal_path(d)}/'" for d in catalog.readable_dirs)
            con.execute(f"SET allowed_directories = [{allowed}]")
            con.execute("SET allowed_paths = []")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except BaseException:
            con.close()
            raise
        return catalog

    def _run_file(self, file: Path, lake_literal: str) -> set[str]:
        """Create the file's views; return the TABLE_DIRS they read."""
        raw = file.read_text(encoding="utf-8")
        used_dirs: set[str] = set()
        for ref in _LAKE_REF_RE.finditer(raw):
            if ref.group(1) not in TABLE_DIRS:
                raise CatalogError(
                    f"{file}: {ref.group(0)!r}: catalog views may read only the lake's table directories "
                    f"${{LAKE}}/<dir>/... for <dir> in {', '.join(TABLE_DIRS)} (catalog.TABLE_DIRS)")
            used_dirs.add(ref.group(1))
        text = raw.replace("${LAKE}", lake_literal)
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
        return used_dirs

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
        with _Deadline(self.connection, self.timeout_s) as deadline:
            try:
                relation = self.connection.sql(statement, params=params)
                return pa.table({}) if relation is None else relation.to_arrow_table()
            except duckdb.InterruptException as exc:
                if deadline.fired:
                    raise CatalogQueryError(
                        f"query stopped: it ran past the SQL time budget of {self.timeout_s:g} s; "
                        f"{_RAISE_TIMEOUT}") from exc
                raise CatalogQueryError(f"query failed: {exc}") from exc
            except duckdb.OutOfMemoryException as exc:
                raise CatalogQueryError(
                    f"query stopped: it needed more than the SQL memory budget of {self.memory_limit} "
                    f"({_first_line(exc)}); {_RAISE_MEMORY}") from exc
            except duckdb.PermissionException as exc:
                dirs = ", ".join(f"{d.name}/" for d in self.readable_dirs) or "none"
                raise CatalogQueryError(
                    f"query refused: SQL may read only the lake's table directories ({dirs}) through the "
                    f"catalog views, not other files inside or outside the lake ({_first_line(exc)})") from exc
            except duckdb.Error as exc:
                raise CatalogQueryError(f"query failed: {exc}") from exc

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
