"""Arrow schemas of the lake's tables and their (atomic, idempotent) read/write.

Schemas (``?`` = nullable):

documents   shards/<shard>/docs.parquet
    shard str, doc_id str, text str, meta str (JSON object of extra input columns),
    source_file str, source_line int64 (1-based line, or row for Parquet inputs)
chunks      chunks/shard=<shard>/part.parquet
    shard str, doc_id str, chunk_id str ("<doc_id>#<chunk_index>"), chunk_index int32,
    n_chunks int32, n_tokens int32, token_ids list<int32>, text str
queries     queries/queries.parquet
    query_id str, prompt str, completion? str, gold_doc_ids? list<str>, meta str,
    source_file str, source_line int64
candidates  candidates/candidates.parquet
    query_id str, doc_id str, chunk_id str, shard str,
    source str (one of CANDIDATE_SOURCES), knn_distance? float32 (cosine distance)
scores      scores/model=<ft_model>/shard=<shard>/part.parquet
    query_id str, doc_id str, chunk_id str, shard str, method str (e.g. "ms-if"),
    damping? float64, damping_kind? str ("absolute" | "relative"), score float64,
    score_mlp? float64, score_attn? float64,
    rank int32 (1 = largest score within the written partition, per query/method/damping),
    pt_model? str, ft_model str, computed_at timestamp[us, UTC]
rejects     rejects/source=<source>/part.parquet
    source str, file str, line? int64 (null = the whole file), field str, reason str, raw str
eval_summary, eval_fidelity, fact_tracing_full, fact_tracing_rerank, fact_tracing_pools,
param_proximity, influence_share   eval/<name>.parquet  (EVAL_TABLES; see schemas below)
counterfactual_removals, lds_subsets, counterfactual_outputs, lds_outputs, counterfactual_summary,
lds_summary, lds_per_query   eval/<name>.parquet  (COUNTERFACTUAL_TABLES: the counterfactual evaluation)

Hive partition columns (``shard`` of chunks and scores, ``source`` of rejects) are not
stored inside the partition files; readers add them back from the path. Every write
checks the schema, the key's uniqueness and the partition value, then replaces the
file or partition atomically, so a rerun yields the same rows, never duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from msif_assets.lake.atomic import atomic_write, replace_directory
from msif_assets.lake.layout import LakeLayout, validate_key
from msif_assets.lake.storage import LakePath, as_lake_path, parquet_location

__all__ = [
    "TableSchemaError", "TableSpec", "CANDIDATE_SOURCES",
    "DOCUMENTS", "CHUNKS", "QUERIES", "CANDIDATES", "SCORES", "REJECTS",
    "FACT_TRACING_FULL", "FACT_TRACING_RERANK", "EVAL_SUMMARY", "EVAL_FIDELITY", "EVAL_TABLES",
    "conform", "write_docs", "read_docs", "write_chunks", "read_chunks",
    "write_queries", "read_queries", "write_candidates", "read_candidates",
    "write_scores", "read_scores", "write_rejects", "read_rejects",
    "write_eval", "read_eval", "list_partitions", "list_shards",
]

CANDIDATE_SOURCES = ("knn", "bm25", "knn+bm25", "all")
_UTC_US = pa.timestamp("us", tz="UTC")


class TableSchemaError(ValueError):
    """A table handed to the lake does not match its declared schema or key."""


@dataclass(frozen=True)
class TableSpec:
    """One lake table: its name, Arrow schema, unique key and hive partition columns."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    partition_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = set(self.schema.names)
        for col in (*self.key, *self.partition_by):
            if col not in names:
                raise ValueError(f"TableSpec {self.name}: column {col!r} not in schema")


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_S = pa.string()
DOCUMENTS = TableSpec("documents", pa.schema([
    _f("shard", _S), _f("doc_id", _S), _f("text", _S), _f("meta", _S),
    _f("source_file", _S), _f("source_line", pa.int64()),
]), key=("shard", "doc_id"))
CHUNKS = TableSpec("chunks", pa.schema([
    _f("shard", _S), _f("doc_id", _S), _f("chunk_id", _S), _f("chunk_index", pa.int32()),
    _f("n_chunks", pa.int32()), _f("n_tokens", pa.int32()),
    _f("token_ids", pa.list_(pa.int32())), _f("text", _S),
]), key=("shard", "chunk_id"), partition_by=("shard",))
QUERIES = TableSpec("queries", pa.schema([
    _f("query_id", _S), _f("prompt", _S), _f("completion", _S, True),
    _f("gold_doc_ids", pa.list_(_S), True), _f("meta", _S),
    _f("source_file", _S), _f("source_line", pa.int64()),
]), key=("query_id",))
CANDIDATES = TableSpec("candidates", pa.schema([
    _f("query_id", _S), _f("doc_id", _S), _f("chunk_id", _S), _f("shard", _S),
    _f("source", _S), _f("knn_distance", pa.float32(), True),
]), key=("query_id", "shard", "chunk_id"), partition_by=("shard",))
SCORES = TableSpec("scores", pa.schema([
    _f("query_id", _S), _f("doc_id", _S), _f("chunk_id", _S), _f("shard", _S),
    _f("method", _S), _f("damping", pa.float64(), True), _f("damping_kind", _S, True),
    _f("score", pa.float64()), _f("score_mlp", pa.float64(), True),
    _f("score_attn", pa.float64(), True), _f("rank", pa.int32()),
    _f("pt_model", _S, True), _f("ft_model", _S), _f("computed_at", _UTC_US),
]), key=("query_id", "shard", "chunk_id", "method", "damping_kind", "damping", "pt_model"),
    partition_by=("shard",))
REJECTS = TableSpec("rejects", pa.schema([
    _f("source", _S), _f("file", _S), _f("line", pa.int64(), True), _f("field", _S),
    _f("reason", _S), _f("raw", _S),
]), key=(), partition_by=("source",))
# Per-query fact-tracing rows, one table per protocol (written by the fact_tracing_eval asset).
_FACT_TRACING_ROWS = pa.schema([
    _f("query_id", _S), _f("method", _S), _f("damping", pa.float64(), True),
    _f("damping_kind", _S, True), _f("n_candidates", pa.int32()), _f("n_gold", pa.int32()),
    _f("first_gold_rank", pa.int32(), True), _f("reciprocal_rank", pa.float64()),
    _f("recall_any_at_10", pa.float64()), _f("recall_frac_at_10", pa.float64()),
    _f("ft_model", _S), _f("computed_at", _UTC_US),
])
_FACT_TRACING_KEY = ("query_id", "method", "damping_kind", "damping", "ft_model")
FACT_TRACING_FULL = TableSpec("fact_tracing_full", _FACT_TRACING_ROWS, key=_FACT_TRACING_KEY)
FACT_TRACING_RERANK = TableSpec("fact_tracing_rerank", _FACT_TRACING_ROWS, key=_FACT_TRACING_KEY)
EVAL_SUMMARY = TableSpec("eval_summary", pa.schema([
    _f("method", _S), _f("damping", pa.float64(), True), _f("damping_kind", _S, True),
    _f("metric", _S), _f("value", pa.float64()), _f("n_queries", pa.int32()),
    _f("ft_model", _S), _f("computed_at", _UTC_US),
]), key=("method", "damping_kind", "damping", "metric", "ft_model"))
EVAL_FIDELITY = TableSpec("eval_fidelity", pa.schema([
    _f("method", _S), _f("reference", _S), _f("damping", pa.float64(), True),
    _f("spearman", pa.float64(), True), _f("pearson", pa.float64(), True),
    _f("n_pairs", pa.int64()), _f("seconds", pa.float64(), True), _f("model", _S),
    _f("computed_at", _UTC_US),
]), key=("method", "reference", "damping", "model"))
FACT_TRACING_POOLS = TableSpec("fact_tracing_pools", pa.schema([
    _f("query_id", _S, False), _f("n_gold", pa.int32(), False), _f("n_gold_in_pool", pa.int32(), False),
    _f("n_bm25", pa.int32(), False), _f("n_same_answer", pa.int32(), False), _f("n_random", pa.int32(), False),
    _f("n_pool", pa.int32(), False), _f("n_eligible", pa.int32(), False), _f("seed", pa.int64(), False),
    _f("ft_model", _S, False), _f("computed_at", _UTC_US, False),
]), key=("query_id", "ft_model"))
PARAM_PROXIMITY = TableSpec("param_proximity", pa.schema([
    _f("scope", _S, False), _f("n_tensors", pa.int32(), False), _f("n_params", pa.int64(), False),
    _f("relative_distance", pa.float64(), False), _f("pt_model", _S, False), _f("ft_model", _S, False),
    _f("computed_at", _UTC_US, False),
]), key=("scope", "pt_model", "ft_model"))
INFLUENCE_SHARE = TableSpec("influence_share", pa.schema([
    _f("method", _S, False), _f("damping_kind", _S, True), _f("damping", pa.float64(), True),
    _f("n_pairs", pa.int64(), False), _f("abs_influence_mlp", pa.float64(), False),
    _f("abs_influence_attn", pa.float64(), False), _f("influence_share_mlp", pa.float64(), False),
    _f("influence_share_attn", pa.float64(), False), _f("param_count_mlp", pa.int64(), False),
    _f("param_count_attn", pa.int64(), False), _f("param_share_mlp", pa.float64(), False),
    _f("param_share_attn", pa.float64(), False), _f("pt_model", _S, False), _f("ft_model", _S, False),
    _f("computed_at", _UTC_US, False),
]), key=("method", "damping_kind", "damping", "pt_model", "ft_model"))
# Counterfactual evaluation (pipeline/counterfactual*.py; views in sql/27_counterfactual.sql).
_F64, _I32, _I64 = pa.float64(), pa.int32(), pa.int64()
_RUN_COLUMNS = [_f("run_key", _S), _f("kind", _S), _f("method", _S, True), _f("damping_kind", _S, True),
                _f("damping", _F64, True), _f("k", _I32, True)]
COUNTERFACTUAL_REMOVALS = TableSpec("counterfactual_removals", pa.schema([
    *[c for c in _RUN_COLUMNS if c.name != "kind"], _f("query_id", _S), _f("doc_id", _S), _f("rank", _I32, True),
    _f("score", _F64, True), _f("ft_model", _S), _f("computed_at", _UTC_US),
]), key=("run_key", "query_id", "doc_id"))
LDS_SUBSETS = TableSpec("lds_subsets", pa.schema([
    _f("subset", _S), _f("doc_id", _S), _f("alpha", _F64), _f("subset_seed", _I64), _f("computed_at", _UTC_US),
]), key=("subset", "doc_id"))
_OUTPUT_ROWS = pa.schema([
    *_RUN_COLUMNS, _f("subset", _S, True), _f("seed", _I64), _f("query_id", _S), _f("logp", _F64),
    _f("n_tokens", _I32), _f("greedy", _S), _f("correct", pa.bool_()), _f("n_train_docs", _I64),
    _f("model_key", _S), _f("ft_model", _S), _f("computed_at", _UTC_US),
])
COUNTERFACTUAL_OUTPUTS = TableSpec("counterfactual_outputs", _OUTPUT_ROWS, key=("run_key", "query_id"))
LDS_OUTPUTS = TableSpec("lds_outputs", _OUTPUT_ROWS, key=("run_key", "query_id"))
COUNTERFACTUAL_SUMMARY = TableSpec("counterfactual_summary", pa.schema([
    *_RUN_COLUMNS, _f("seed", _I64), _f("n_queries", _I32), _f("n_removed", _I64),
    *[_f(c, _F64, True) for c in ("mean_delta_logp", "delta_ci_lo", "delta_ci_hi", "mean_abs_delta_logp",
                                  "frac_logp_down", "flip_rate", "flip_ci_lo", "flip_ci_hi", "accuracy", "train_seconds")],
    _f("args", _S), _f("ft_model", _S), _f("computed_at", _UTC_US),
]), key=("run_key",))
_LDS_KEY_COLUMNS = [_f("method", _S), _f("damping_kind", _S, True), _f("damping", _F64, True), _f("seed", _I64, True)]
LDS_SUMMARY = TableSpec("lds_summary", pa.schema([
    *_LDS_KEY_COLUMNS, _f("lds", _F64, True), _f("ci_lo", _F64, True), _f("ci_hi", _F64, True),
    _f("ci_lo_subsets", _F64, True), _f("ci_hi_subsets", _F64, True), _f("n_queries", _I32), _f("n_subsets", _I32), _f("alpha", _F64), _f("args", _S), _f("ft_model", _S),
    _f("computed_at", _UTC_US),
]), key=("method", "damping_kind", "damping", "seed"))
LDS_PER_QUERY = TableSpec("lds_per_query", pa.schema([
    *_LDS_KEY_COLUMNS, _f("query_id", _S), _f("spearman", _F64, True), _f("n_subsets", _I32), _f("ft_model", _S),
    _f("computed_at", _UTC_US),
]), key=("method", "damping_kind", "damping", "seed", "query_id"))
COUNTERFACTUAL_TABLES: dict[str, TableSpec] = {
    s.name: s for s in (COUNTERFACTUAL_REMOVALS, LDS_SUBSETS, COUNTERFACTUAL_OUTPUTS, LDS_OUTPUTS, COUNTERFACTUAL_SUMMARY,
                        LDS_SUMMARY, LDS_PER_QUERY)
}
EVAL_TABLES: dict[str, TableSpec] = {
    s.name: s for s in (EVAL_SUMMARY, EVAL_FIDELITY, FACT_TRACING_FULL, FACT_TRACING_RERANK, FACT_TRACING_POOLS,
                        PARAM_PROXIMITY, INFLUENCE_SHARE)
} | COUNTERFACTUAL_TABLES


def conform(table: pa.Table, spec: TableSpec, *, fill_missing_nullable: bool = False) -> pa.Table:
    """Return ``table`` cast to ``spec.schema`` (column order too), or raise.

    Raises TableSchemaError for missing or unexpected columns, uncastable types, nulls
    in non-nullable columns, or duplicate keys. ``fill_missing_nullable`` (used on
    read) fills nullable columns absent from older files with nulls.
    """
    have = set(table.column_names)
    extra = sorted(have - set(spec.schema.names))
    if extra:
        raise TableSchemaError(f"{spec.name}: unexpected columns {extra}; expected {spec.schema.names}")
    columns = []
    for field in spec.schema:
        if field.name not in have:
            if fill_missing_nullable and field.nullable:
                columns.append(pa.nulls(table.num_rows, field.type))
                continue
            raise TableSchemaError(f"{spec.name}: missing column {field.name!r} ({field.type})")
        col = table.column(field.name)
        try:
            col = col.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise TableSchemaError(f"{spec.name}.{field.name}: cannot cast {col.type} to {field.type}: {exc}") from exc
        if not field.nullable and col.null_count:
            raise TableSchemaError(f"{spec.name}.{field.name}: {col.null_count} null value(s) in a required column")
        columns.append(col)
    out = pa.Table.from_arrays(columns, schema=spec.schema)
    if spec.key and out.num_rows:
        n_unique = out.group_by(list(spec.key)).aggregate([]).num_rows
        if n_unique != out.num_rows:
            raise TableSchemaError(
                f"{spec.name}: {out.num_rows - n_unique} duplicate row(s) on key {spec.key}; "
                "deduplicate before writing"
            )
    return out


def _write_parquet_atomic(path: LakePath, table: pa.Table) -> Path:
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _require_constant(table: pa.Table, spec: TableSpec, column: str, value: str) -> None:
    if table.num_rows == 0:
        return
    values = set(table.column(column).unique().to_pylist())
    if values != {value}:
        raise TableSchemaError(f"{spec.name}: column {column!r} must be {value!r} for this partition, found {sorted(values)}")


def _write_partition(layout: LakeLayout, part_dir: Path, table: pa.Table, spec: TableSpec,
                     values: Mapping[str, str]) -> Path:
    table = conform(table, spec)
    for col, value in values.items():
        _require_constant(table, spec, col, value)
    stored = table.drop_columns(list(spec.partition_by))
    replace_directory(part_dir, lambda d: pq.write_table(stored, d / "part.parquet", compression="zstd"),
                      layout.staging_dir)
    return part_dir / "part.parquet"


def _read_file(path: LakePath, spec: TableSpec, partition: Mapping[str, str] | None = None) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name}: no table at {path} (has it been materialized?)")
    source, filesystem = parquet_location(path)
    table = pq.read_table(source, filesystem=filesystem)
    for col, value in (partition or {}).items():
        if col not in table.column_names:
            table = table.append_column(col, pa.array([value] * table.num_rows, pa.string()))
    return conform(table, spec, fill_missing_nullable=True)


def write_docs(layout: LakeLayout, shard: str, docs: pa.Table) -> Path:
    """Replace the documents of ``shard`` (schema DOCUMENTS)."""
    docs = conform(docs, DOCUMENTS)
    _require_constant(docs, DOCUMENTS, "shard", validate_key(shard, "shard"))
    return _write_parquet_atomic(layout.shard_docs_file(shard), docs)


def read_docs(layout: LakeLayout, shard: str) -> pa.Table:
    return _read_file(layout.shard_docs_file(shard), DOCUMENTS)


def write_chunks(layout: LakeLayout, shard: str, chunks: pa.Table) -> Path:
    """Replace the chunk partition of ``shard`` (schema CHUNKS)."""
    return _write_partition(layout, layout.chunks_partition(shard), chunks, CHUNKS, {"shard": shard})


def read_chunks(layout: LakeLayout, shard: str) -> pa.Table:
    return _read_file(layout.chunks_file(shard), CHUNKS, {"shard": shard})


def write_queries(layout: LakeLayout, queries: pa.Table) -> Path:
    return _write_parquet_atomic(layout.queries_file, conform(queries, QUERIES))


def read_queries(layout: LakeLayout) -> pa.Table:
    return _read_file(layout.queries_file, QUERIES)


def write_candidates(layout: LakeLayout, shard: str, candidates: pa.Table) -> Path:
    """Replace the candidates of one shard (candidate pools are per shard, so a new shard
    never changes another shard's pool)."""
    candidates = conform(candidates, CANDIDATES)
    bad = set(candidates.column("source").unique().to_pylist()) - set(CANDIDATE_SOURCES)
    if bad:
        raise TableSchemaError(f"candidates.source: unknown value(s) {sorted(bad)}; allowed {CANDIDATE_SOURCES}")
    return _write_partition(layout, layout.candidates_partition(shard), candidates, CANDIDATES, {"shard": shard})


def read_candidates(layout: LakeLayout, shard: str) -> pa.Table:
    return _read_file(layout.candidates_file(shard), CANDIDATES, {"shard": shard})


def write_scores(layout: LakeLayout, ft_model: str, shard: str, scores: pa.Table) -> Path:
    """Replace the score partition ``model=<ft_model>/shard=<shard>`` (schema SCORES)."""
    scores = conform(scores, SCORES)
    _require_constant(scores, SCORES, "ft_model", ft_model)
    return _write_partition(layout, layout.scores_partition(ft_model, shard), scores, SCORES, {"shard": shard})


def read_scores(layout: LakeLayout, ft_model: str, shard: str) -> pa.Table:
    return _read_file(layout.scores_file(ft_model, shard), SCORES, {"shard": shard})


def write_rejects(layout: LakeLayout, source: str, rejects: pa.Table) -> Path:
    """Replace the rejects of ``source`` (e.g. ``corpus-<shard>``, ``queries``).

    An empty table is written too, so a clean rerun clears earlier rejects.
    """
    return _write_partition(layout, layout.rejects_partition(source), rejects, REJECTS, {"source": source})


def read_rejects(layout: LakeLayout, source: str) -> pa.Table:
    return _read_file(layout.rejects_file(source), REJECTS, {"source": source})


def write_eval(layout: LakeLayout, name: str, table: pa.Table) -> Path:
    """Replace evaluation table ``name`` (one of EVAL_TABLES)."""
    if name not in EVAL_TABLES:
        raise TableSchemaError(f"unknown evaluation table {name!r}; known: {sorted(EVAL_TABLES)}")
    return _write_parquet_atomic(layout.eval_file(name), conform(table, EVAL_TABLES[name]))


def read_eval(layout: LakeLayout, name: str) -> pa.Table:
    if name not in EVAL_TABLES:
        raise TableSchemaError(f"unknown evaluation table {name!r}; known: {sorted(EVAL_TABLES)}")
    return _read_file(layout.eval_file(name), EVAL_TABLES[name])


def list_partitions(table_dir: LakePath) -> list[dict[str, str]]:
    """Hive partitions (``k=v`` directory chains) under ``table_dir`` that hold part.parquet."""
    out = []
    table_dir = as_lake_path(table_dir)
    if not table_dir.is_dir():
        return out
    for part in sorted(table_dir.glob("**/part.parquet"), key=str):
        rel = part.parent.relative_to(table_dir).parts
        if rel and all("=" in p and not p.startswith(".") for p in rel):
            out.append(dict(p.split("=", 1) for p in rel))
    return out


def list_shards(layout: LakeLayout) -> list[str]:
    """Shards whose documents have been written."""
    if not layout.shards_dir.is_dir():
        return []
    return sorted(p.parent.name for p in layout.shards_dir.glob("*/docs.parquet"))
