"""Columnar corpus shards — Hugging Face ``datasets`` on disk, Arrow and Parquet files — read
in batches, never whole.

A shard may be:

- a directory written by ``datasets.Dataset.save_to_disk`` (it holds ``state.json`` /
  ``dataset_info.json`` and ``data-*.arrow``): memory-mapped, iterated with ``Dataset.iter``;
- an ``.arrow`` file: the Arrow IPC stream ``datasets`` writes (``Dataset.from_file``,
  memory-mapped) or an Arrow IPC file / Feather v2 (memory-mapped with pyarrow);
- a ``.parquet`` file: ``pyarrow.parquet.ParquetFile.iter_batches``, one row group at a time.

Peak memory is one batch of rows (``BATCH_ROWS``; for Parquet also one row group), not the shard.

Columns come from :class:`~msif_assets.lake.inputs.CorpusColumns` (``[inputs] text_column`` /
``id_column``). A configured column the shard lacks raises InputError naming the file, the
column, the columns there are and the setting. With ``id_column`` unset and no ``doc_id``
column, ids are ``"<shard>:<row number>"`` (1-based; file stem or directory name), stable while
the rows keep their order. An integer id column is read as its decimal string. Other columns
are metadata. Row validation (a reject row per bad row) is :func:`inputs.read_corpus_shard`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from msif_assets.lake.inputs import CorpusColumns, InputError, _Row

__all__ = [
    "BATCH_ROWS", "COLUMNAR_SUFFIXES", "UnreadableShard", "columnar_rows", "is_dataset_dir", "dataset_dir_problem",
    "shard_files",
]

BATCH_ROWS = 1024
COLUMNAR_SUFFIXES = (".arrow", ".parquet")
_DATASET_MARKERS = ("state.json", "dataset_info.json")
_DATASET_DICT_MARKER = "dataset_dict.json"
_IPC_FILE_MAGIC = b"ARROW1"  # an IPC *stream* (what datasets writes) starts with a continuation marker instead


class UnreadableShard(OSError):
    """The shard cannot be opened as a dataset; it becomes one file-level reject row."""


def is_dataset_dir(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in _DATASET_MARKERS)


def dataset_dir_problem(path: Path) -> str | None:
    """For a directory in the inbox that is not a shard, what to do instead (None for other dirs)."""
    if (path / _DATASET_DICT_MARKER).is_file():
        return ("a datasets.DatasetDict (several splits) — save one split per shard, e.g. "
                f"dataset_dict['train'].save_to_disk('{path.parent}/<shard name>')")
    return None


def shard_files(path: Path) -> list[Path]:
    """The files whose bytes make up one inbox shard entry: itself, or every file of a dataset directory."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def _require_columns(path: Path, schema: pa.Schema, columns: CorpusColumns) -> None:
    names = schema.names
    wanted = [("text_column", columns.text)] + ([("id_column", columns.id)] if columns.id is not None else [])
    for setting, column in wanted:
        if column not in names:
            raise InputError(
                f"{path}: column {column!r} — not in this shard "
                f"(its columns: {', '.join(map(repr, names)) or 'none'}) — "
                f"set [inputs] {setting} in msif.toml to the column that holds the "
                f"{'document text' if setting == 'text_column' else 'document id'}, or rename the column")


def _rebatched(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)


def _open(path: Path, batch_rows: int) -> tuple[pa.Schema, Iterator[pa.Table | pa.RecordBatch]]:
    """The shard's Arrow schema and an iterator of batches of at most ``batch_rows`` rows."""
    import datasets

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path), keep_in_memory=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UnreadableShard(f"not a readable Dataset.save_to_disk directory ({type(exc).__name__}: {exc}) — "
                                  "save it again with Dataset.save_to_disk") from exc
        if not isinstance(ds, datasets.Dataset):
            raise UnreadableShard(f"holds a {type(ds).__name__}, not one Dataset — save one split per shard")
        return ds.data.schema, ds.with_format("arrow").iter(batch_size=batch_rows)
    if path.suffix.lower() == ".parquet":
        # Not load_dataset("parquet", streaming=True): with a consumer slower than the disk (row
        # validation is), datasets 5.2 holds the whole file in Arrow memory ahead of it (measured).
        parquet = pq.ParquetFile(path)
        return parquet.schema_arrow, parquet.iter_batches(batch_size=batch_rows)
    with open(path, "rb") as fh:
        ipc_file = fh.read(len(_IPC_FILE_MAGIC)) == _IPC_FILE_MAGIC
    if ipc_file:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        return reader.schema, _rebatched(batches, batch_rows)
    ds = datasets.Dataset.from_file(str(path), in_memory=False)
    return ds.data.schema, ds.with_format("arrow").iter(batch_size=batch_rows)


def columnar_rows(path: str | Path, columns: CorpusColumns = CorpusColumns(),
                  batch_rows: int = BATCH_ROWS) -> Iterator[_Row]:
    """Rows of a dataset directory, ``.arrow`` or ``.parquet`` shard, one batch in memory at a time.

    Raises InputError (a configured column is missing) or UnreadableShard / ``pa.ArrowException``
    (the file cannot be read) when first advanced.
    """
    path = Path(path)
    schema, batches = _open(path, batch_rows)
    _require_columns(path, schema, columns)
    id_key = columns.id_key
    derive = id_key not in schema.names
    int_ids = not derive and pa.types.is_integer(schema.field(id_key).type)
    prefix = path.name if path.is_dir() else path.stem
    row_no = 0
    for batch in batches:
        for obj in batch.to_pylist():
            row_no += 1
            raw = json.dumps(obj, ensure_ascii=False, default=str)
            if derive:
                yield _Row(row_no, obj, raw, f"{prefix}:{row_no}")
                continue
            if int_ids and obj[id_key] is not None:
                obj[id_key] = str(obj[id_key])
            yield _Row(row_no, obj, raw)
