"""Queries and fine-tuning data: strict readers. Unlike a corpus shard, whose bad rows become
rejects, these files are small and hand-made, so the first bad line is an InputError naming the
file, line and field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from msif_assets.lake.chat import parse_messages, transcript
from msif_assets.lake.inputs import InputError, _check_str, _jsonl_rows, _meta, _Reject
from msif_assets.lake.tables import QUERIES

__all__ = ["FinetuneData", "FINETUNE_SCHEMA", "read_queries_file", "read_finetune_file"]


def _strict_rows(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise InputError(f"{path}: file — not found — provide the {what} JSONL file")
    if path.suffix.lower() != ".jsonl":
        raise InputError(f"{path}: file — expected a .jsonl file for {what} — convert it to JSON Lines")
    for row in _jsonl_rows(path):
        if isinstance(row.obj, _Reject):
            raise InputError(f"{path}:{row.line}: {row.obj.field} — {row.obj.reason} — fix or remove the line")
        yield row.line, row.obj


def _strict_str(path: Path, line: int, obj: dict, field: str, required: bool, hint: str) -> str | None:
    value = _check_str(obj, field, required=required)
    if isinstance(value, _Reject):
        raise InputError(f"{path}:{line}: {field} — {value.reason} — {hint}")
    return value


def _chat_only(path: Path, line: int, obj: dict, others: tuple[str, ...]) -> None:
    """A ``messages`` row must not also give the fields of another form."""
    for field in others:
        if field in obj:
            raise InputError(f"{path}:{line}: {field} — given together with messages, so the row is ambiguous — "
                             f"give either messages or {'/'.join(others)}, not both")


def read_queries_file(path: str | Path) -> pa.Table:
    """Read queries JSONL into tables.QUERIES.

    Fields: ``query_id`` (str), ``prompt`` (str), optional ``completion`` (str),
    optional ``gold_doc_ids`` (list of str, for fact-tracing evaluation); other keys go
    to ``meta``. Instead of prompt/completion a row may give ``messages`` (chat turns ending
    with the assistant's answer, see lake.chat): they are kept in ``meta.messages``, the
    answer is the completion and ``prompt`` holds a plain transcript until the fine-tuned
    model's template renders it. Raises InputError on the first bad line, on a repeated
    query_id and on a file with no queries.
    """
    p = Path(path)
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for line, obj in _strict_rows(p, "queries"):
        qid = _strict_str(p, line, obj, "query_id", True, "give each query a unique string id")
        if qid in seen:
            raise InputError(f"{p}:{line}: query_id — duplicate {qid!r} (first on line {seen[qid]}) — "
                             "make query ids unique")
        seen[qid] = line
        if "messages" in obj:
            _chat_only(p, line, obj, ("prompt", "completion"))
            messages = parse_messages(obj["messages"], f"{p}:{line}")
            prompt, completion = transcript(messages), messages[-1]["content"]
        else:
            prompt = _strict_str(p, line, obj, "prompt", True, "give the prompt text (or chat turns as messages)")
            completion = _strict_str(p, line, obj, "completion", False,
                                     "give the completion text or omit the field")
        gold = obj.get("gold_doc_ids")
        if gold is not None and not (isinstance(gold, list) and all(isinstance(g, str) and g for g in gold)):
            raise InputError(f"{p}:{line}: gold_doc_ids — expected a list of non-empty strings — "
                             'write e.g. ["doc-1", "doc-7"] or omit the field')
        rows.append({"query_id": qid, "prompt": prompt, "completion": completion, "gold_doc_ids": gold,
                     "meta": _meta(obj, ("query_id", "prompt", "completion", "gold_doc_ids")),  # keeps messages
                     "source_file": str(p), "source_line": line})
    if not rows:
        raise InputError(f"{p}: file — contains no queries — add at least one JSON line")
    return pa.Table.from_pylist(rows, schema=QUERIES.schema)


FINETUNE_SCHEMA = pa.schema([
    pa.field("text", pa.string()), pa.field("prompt", pa.string()), pa.field("completion", pa.string()),
    pa.field("label", pa.string()), pa.field("messages", pa.string()), pa.field("meta", pa.string(), nullable=False),
    pa.field("source_line", pa.int64(), nullable=False),
])

_FINETUNE_KINDS = ("lm", "prompt_completion", "classification", "chat")


@dataclass(frozen=True)
class FinetuneData:
    """Fine-tuning examples of one kind.

    kind: "lm" (``text``), "prompt_completion" (``prompt``+``completion``),
    "classification" (``text``+``label``; integer labels are stored as decimal
    strings, string labels as given — map them with the model's ``label2id``) or
    "chat" (``messages``, stored as a JSON string, rendered with the model's chat template).
    table: FINETUNE_SCHEMA; columns unused by ``kind`` are null.
    source: the file read, for errors that name a row (``source:source_line``).
    """

    kind: str
    table: pa.Table
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _FINETUNE_KINDS:
            raise ValueError(f"FinetuneData.kind must be one of {_FINETUNE_KINDS}, got {self.kind!r}")
        if self.table.schema != FINETUNE_SCHEMA:
            raise ValueError("FinetuneData.table must have FINETUNE_SCHEMA")


def _finetune_kind(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "label" in obj:
        return "classification"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "lm"
    return None


def read_finetune_file(path: str | Path) -> FinetuneData:
    """Read fine-tuning JSONL; every line must use the same one of the four forms."""
    p = Path(path)
    kind: str | None = None
    rows: list[dict] = []
    forms = "use {'text'}, {'prompt','completion'}, {'text','label'} or {'messages'}"
    for line, obj in _strict_rows(p, "fine-tuning data"):
        row_kind = _finetune_kind(obj)
        if row_kind is None:
            raise InputError(f"{p}:{line}: text — no 'text', 'prompt', 'label' or 'messages' field — {forms}")
        if kind is None:
            kind = row_kind
        elif row_kind != kind:
            raise InputError(f"{p}:{line}: <line> — this line is {row_kind} but earlier lines are {kind} — "
                             "use one form for the whole file")
        row = {"text": None, "prompt": None, "completion": None, "label": None, "messages": None, "source_line": line}
        if kind == "chat":
            _chat_only(p, line, obj, ("prompt", "completion", "text", "label"))
            row["messages"] = json.dumps(parse_messages(obj["messages"], f"{p}:{line}"), ensure_ascii=False)
        elif kind == "prompt_completion":
            if "text" in obj:
                raise InputError(f"{p}:{line}: text — ambiguous next to prompt/completion — {forms}")
            row["prompt"] = _strict_str(p, line, obj, "prompt", True, "give the prompt text")
            row["completion"] = _strict_str(p, line, obj, "completion", True, "give the completion text")
        else:
            row["text"] = _strict_str(p, line, obj, "text", True, "give the training text")
        if kind == "classification":
            label = obj["label"]
            if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
                raise InputError(f"{p}:{line}: label — expected an integer class index or a class name, "
                                 f"got {label!r} — fix the label")
            row["label"] = str(label)
        row["meta"] = _meta(obj, ("text", "prompt", "completion", "label", "messages"))
        rows.append(row)
    if kind is None:
        raise InputError(f"{p}: file — contains no examples — add at least one JSON line")
    return FinetuneData(kind, pa.Table.from_pylist(rows, schema=FINETUNE_SCHEMA), str(p))
