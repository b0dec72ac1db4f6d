"""Readers for the files users bring: corpus shards, queries, fine-tuning data.

Corpus shards are large and messy, so bad rows become *reject rows* and the rest of
the shard loads. Queries and fine-tuning data are small curated files, so the first
bad row raises ``InputError("file:line: field — problem — what to do")``.

Corpus file formats (chosen by suffix):

- ``.jsonl``: one JSON object per line with ``doc_id`` (non-empty str) and ``text``
  (str, not blank). Any other keys are kept as metadata (``meta``, a JSON object
  string). Blank lines are skipped; they hold no record.
- ``.parquet``, ``.arrow`` and ``Dataset.save_to_disk`` directories: same fields as columns,
  read in batches (``hf_corpus``); row numbers (1-based) stand in for lines.
- ``.txt``: one document per non-blank line; ``doc_id = "<file stem>:<line number>"``
  (1-based physical line number, so ids stay stable when blank lines are present).

``[inputs] text_column`` / ``id_column`` (:class:`CorpusColumns`) rename ``text`` / ``doc_id``
in JSONL and columnar shards; a columnar shard without an id column gets derived ids.

Suffixes match case-insensitively (``.JSONL`` is JSON Lines). Every string stored must be
valid Unicode: a JSON ``\\ud800``-style escape of a lone surrogate in ``doc_id``, ``text``
or a metadata field (key or value) rejects the row, like bytes that are not UTF-8.

Tables returned:
  docs    (tables.DOCUMENTS)  shard, doc_id, text, meta, source_file, source_line
  rejects (tables.REJECTS)    source, file, line, field, reason, raw
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import pyarrow as pa

from msif_assets.lake.layout import PartitionKeyError, validate_key
from msif_assets.lake.tables import DOCUMENTS, REJECTS

__all__ = [
    "InputError", "ShardRead", "CORPUS_SUFFIXES", "CorpusColumns",
    "read_corpus_shard", "read_corpus_file", "shard_key_from_path", "corpus_reject_source",
    "find_cross_shard_duplicates", "reject_cross_shard_duplicates",
]

CORPUS_SUFFIXES = (".jsonl", ".parquet", ".arrow", ".txt")
_RAW_LIMIT = 1000
_DOCS_BATCH = 8192
_BOM = b"\xef\xbb\xbf"


class InputError(ValueError):
    """A user-supplied file is unusable; the message names file, line, field and the fix."""


@dataclass(frozen=True)
class CorpusColumns:
    """Which field of a structured shard (JSONL key, Arrow/Parquet column) holds the text and
    which the id (``[inputs] text_column`` / ``id_column``). ``id`` None: ``doc_id``, and a
    columnar shard without that column gets derived ids (``hf_corpus``)."""

    text: str = "text"
    id: str | None = None

    @property
    def id_key(self) -> str:
        return self.id or "doc_id"

    def to_config(self) -> dict[str, str | None]:
        return {"text_column": self.text, "id_column": self.id}


class ShardRead(NamedTuple):
    docs: pa.Table
    rejects: pa.Table


def corpus_reject_source(shard: str) -> str:
    """The ``source`` under which a corpus shard's rejects are stored."""
    return f"corpus-{validate_key(shard, 'shard')}"


def shard_key_from_path(path: str | Path) -> str:
    """Shard key for a corpus file (its stem) or dataset directory (its name): a safe partition key."""
    p = Path(path)
    try:
        return validate_key(p.name if p.is_dir() else p.stem, "shard key")
    except PartitionKeyError as exc:
        raise InputError(f"{p}: file name — {exc}") from exc


class _Row(NamedTuple):
    line: int
    obj: Any  # parsed object, or a _Reject
    raw: str
    doc_id: str | None = None  # derived id (the shard has no id field)


class _Reject(NamedTuple):
    field: str
    reason: str


def _storable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) shown as ``\\udXXX``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _clip(raw: str) -> str:
    raw = _storable(raw)
    return raw if len(raw) <= _RAW_LIMIT else raw[:_RAW_LIMIT] + "…"


def _unicode_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored (a lone surrogate), or None."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return (f"invalid Unicode: lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start} "
                "(a \\uXXXX escape without its pair); fix the escape or the text that produced it")


def _decode(raw: bytes, line_no: int) -> str | _Reject:
    if line_no == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        hint = ""
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
            hint = " (NUL bytes or a UTF-16 byte-order mark: the file looks UTF-16)"
        return _Reject("<line>", f"invalid UTF-8 at byte {exc.start}{hint}; re-encode the file as UTF-8")
    if "\x00" in text:
        return _Reject("<line>", f"NUL byte at character {text.index(chr(0))}: the file looks UTF-16 or binary; "
                                 "re-encode it as UTF-8 text")
    return text


def _decoded_lines(path: Path) -> Iterator[tuple[int, "str | _Reject", str]]:
    """``(line number, decoded text or a reject, the raw line as shown in rejects)``."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            yield line_no, _decode(raw, line_no), raw.decode("utf-8", "backslashreplace").rstrip("\r\n")


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    for line_no, text, shown in _decoded_lines(path):
        if isinstance(text, _Reject):
            yield _Row(line_no, text, shown)
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            obj = _Reject("<line>", f"malformed JSON: {exc.msg} at column {exc.colno}")
        else:
            if not isinstance(obj, dict):
                obj = _Reject("<line>", f"expected a JSON object, got {type(obj).__name__}")
        yield _Row(line_no, obj, shown)


def _txt_rows(path: Path) -> Iterator[_Row]:
    for line_no, text, shown in _decoded_lines(path):
        if isinstance(text, _Reject):
            yield _Row(line_no, text, shown)
        elif text.strip():
            yield _Row(line_no, {"doc_id": f"{path.stem}:{line_no}", "text": text}, shown)


def _check_str(obj: dict, field: str, *, required: bool = True) -> str | _Reject | None:
    if field not in obj or obj[field] is None:
        return _Reject(field, "missing field") if required else None
    value = obj[field]
    if not isinstance(value, str):
        return _Reject(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        return _Reject(field, "empty or blank string")
    problem = _unicode_problem(value)
    if problem is not None:
        return _Reject(field, problem)
    return value


def _meta(obj: dict, known: Iterable[str]) -> str:
    extras = {k: v for k, v in obj.items() if k not in set(known)}
    return json.dumps(extras, ensure_ascii=False, sort_keys=True, default=str)


def _meta_or_reject(obj: dict, known: Iterable[str]) -> str | _Reject:
    """The metadata JSON string, or a reject naming the first field that is not valid Unicode."""
    meta = _meta(obj, known)
    if _unicode_problem(meta) is None:
        return meta
    for key in sorted((k for k in obj if k not in set(known)), key=_storable):
        for part in (key, json.dumps(obj[key], ensure_ascii=False, default=str)):
            problem = _unicode_problem(part)
            if problem is not None:
                return _Reject(_storable(key), f"metadata {'key' if part is key else 'value'}: {problem}")
    return _Reject("<line>", "metadata is not valid Unicode; fix the line")  # unreachable in practice


def read_corpus_shard(shard: str, files: Sequence[str | Path], columns: CorpusColumns = CorpusColumns()) -> ShardRead:
    """Read every file (or dataset directory) of one corpus shard into (docs, rejects).

    A ``doc_id`` repeated inside the shard keeps its first occurrence; later ones are
    rejected with the location of the first. Unreadable files become one reject row
    with ``line = null``. Unknown suffixes and a configured column missing from a columnar
    shard raise InputError (the shard is misconfigured).
    """
    from msif_assets.lake.hf_corpus import COLUMNAR_SUFFIXES, columnar_rows  # imports this module

    validate_key(shard, "shard")
    source = corpus_reject_source(shard)
    parts: list[pa.Table] = []
    docs: list[dict] = []
    rejects: list[dict] = []
    first_seen: dict[str, str] = {}
    for file in files:
        path = Path(file)
        readers = {".jsonl": _jsonl_rows, ".txt": _txt_rows}
        reader = readers.get(path.suffix.lower())
        if path.is_dir() or path.suffix.lower() in COLUMNAR_SUFFIXES:
            reader = lambda p: columnar_rows(p, columns)  # noqa: E731
        elif reader is None:
            raise InputError(f"{path}: file type — unsupported suffix {path.suffix!r} — "
                             f"use one of {', '.join(CORPUS_SUFFIXES)} or a Dataset.save_to_disk directory")
        id_key, text_key = ("doc_id", "text") if reader is _txt_rows else (columns.id_key, columns.text)

        def reject(line: int | None, field: str, reason: str, raw: str) -> None:
            rejects.append({"source": source, "file": _storable(str(path)), "line": line,
                            "field": _storable(field), "reason": _storable(reason), "raw": _clip(raw)})

        try:
            for row in reader(path):
                if isinstance(row.obj, _Reject):
                    reject(row.line, row.obj.field, row.obj.reason, row.raw)
                    continue
                doc_id = row.doc_id if row.doc_id is not None else _check_str(row.obj, id_key)
                text = _check_str(row.obj, text_key)
                meta = _meta_or_reject(row.obj, (text_key,) if row.doc_id is not None else (id_key, text_key))
                bad = next((v for v in (doc_id, text, meta) if isinstance(v, _Reject)), None)
                if bad is not None:
                    reject(row.line, bad.field, bad.reason, row.raw)
                    continue
                where = f"{path}:{row.line}"
                if doc_id in first_seen:
                    reject(row.line, id_key, f"duplicate doc_id {doc_id!r} in shard {shard!r}; "
                           f"first seen at {first_seen[doc_id]} (kept)", row.raw)
                    continue
                first_seen[doc_id] = where
                docs.append({"shard": shard, "doc_id": doc_id, "text": text, "meta": meta,
                             "source_file": str(path), "source_line": row.line})
                if len(docs) >= _DOCS_BATCH:  # Arrow holds the shard's documents far more compactly than dicts
                    parts.append(pa.Table.from_pylist(docs, schema=DOCUMENTS.schema))
                    docs = []
        except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:
            reject(None, "<file>", f"unreadable file: {exc}", "")
    parts.append(pa.Table.from_pylist(docs, schema=DOCUMENTS.schema))
    return ShardRead(pa.concat_tables(parts), pa.Table.from_pylist(rejects, schema=REJECTS.schema))


def read_corpus_file(path: str | Path, shard: str | None = None, columns: CorpusColumns = CorpusColumns()) -> ShardRead:
    """Read one corpus file as a shard (shard key defaults to the file stem)."""
    return read_corpus_shard(shard if shard is not None else shard_key_from_path(path), [path], columns)


def find_cross_shard_duplicates(docs: pa.Table | Iterable[pa.Table]) -> pa.Table:
    """doc_ids present in more than one shard: table(doc_id str, shards list<str>).

    Accepts one table or several with columns ``shard`` and ``doc_id``.
    """
    tables = [docs] if isinstance(docs, pa.Table) else list(docs)
    schema = pa.schema([("doc_id", pa.string()), ("shards", pa.list_(pa.string()))])
    if not tables:
        return schema.empty_table()
    both = pa.concat_tables([t.select(["doc_id", "shard"]) for t in tables])
    grouped = both.group_by("doc_id").aggregate([("shard", "distinct")])
    rows = [{"doc_id": d, "shards": sorted(s)}
            for d, s in zip(grouped.column("doc_id").to_pylist(), grouped.column("shard_distinct").to_pylist())
            if len(s) > 1]
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["doc_id"]), schema=schema)


def reject_cross_shard_duplicates(docs: pa.Table, earlier: pa.Table) -> ShardRead:
    """Split one shard's ``docs`` on the cross-shard rule: a ``doc_id`` that a shard whose
    name sorts first also has stays there, and is rejected here.

    ``earlier``: columns ``doc_id``, ``shard``, ``source_file``, ``source_line`` of the
    (in-shard valid) documents of every shard whose name sorts before this one; when an id is
    in several, the first by (shard, file, line) is named as the one that keeps it.
    Returns (kept docs, reject rows naming both shards and both locations).
    """
    if docs.num_rows == 0 or earlier.num_rows == 0:
        return ShardRead(docs, REJECTS.schema.empty_table())
    import pyarrow.compute as pc

    taken = pc.is_in(docs.column("doc_id"), value_set=earlier.column("doc_id").combine_chunks())
    if not pc.any(taken).as_py():
        return ShardRead(docs, REJECTS.schema.empty_table())
    owner: dict[str, dict] = {}
    order = earlier.sort_by([("shard", "ascending"), ("source_file", "ascending"), ("source_line", "ascending")])
    for row in order.filter(pc.is_in(order.column("doc_id"), value_set=docs.column("doc_id").combine_chunks())).to_pylist():
        owner.setdefault(row["doc_id"], row)
    rejects = []
    for row in docs.filter(taken).to_pylist():
        first = owner[row["doc_id"]]
        raw = json.dumps({"doc_id": row["doc_id"], "text": row["text"], **json.loads(row["meta"])},
                         ensure_ascii=False, default=str)
        rejects.append({
            "source": corpus_reject_source(row["shard"]), "file": row["source_file"], "line": row["source_line"],
            "field": "doc_id",
            "reason": f"duplicate doc_id {row['doc_id']!r} across shards: shard {first['shard']!r} has it too "
                      f"({first['source_file']}:{first['source_line']}) and sorts before shard {row['shard']!r}, "
                      "so it is kept there — give the documents distinct ids or remove one",
            "raw": _clip(raw),
        })
    return ShardRead(docs.filter(pc.invert(taken)), pa.Table.from_pylist(rejects, schema=REJECTS.schema))
