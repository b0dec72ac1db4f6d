"""Corpus shards as Hugging Face ``datasets`` on disk: ``Dataset.save_to_disk`` directories and
``.arrow`` files (and Parquet with the same column settings), written here by ``datasets`` itself.
Bad rows become reject rows, a missing configured column is an error naming the fix, and the
reader holds one batch, not the shard."""

from __future__ import annotations

import inspect
import json
import os
import tracemalloc
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from datasets.arrow_writer import ArrowWriter

from msif_assets.lake import tables
from msif_assets.lake.hf_corpus import columnar_rows
from msif_assets.lake.inputs import CorpusColumns, InputError, corpus_reject_source, read_corpus_file
from msif_assets.lake.layout import LakeLayout
from msif_assets.pipeline.corpus import files_digest, files_stat, ingest_shard, scan_inbox

datasets.disable_progress_bars()


def _save(path: Path, columns: dict) -> Path:
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def _arrow(path: Path, columns: dict) -> Path:
    """An ``.arrow`` file as ``datasets`` writes it (an Arrow IPC stream with its features)."""
    with ArrowWriter(path=str(path)) as writer:
        writer.write_batch(columns)
        writer.finalize()
    return path


def _rejects(read) -> dict[int | None, tuple[str, str]]:
    return {r["line"]: (r["field"], r["reason"]) for r in read.rejects.to_pylist()}


MIXED = {
    "doc_id": ["a", "b", None, "a", "e", "f"],
    "text": ["Ada was born in Paris .", "  ", "no id", "same id again", None, "Fay met Oslo ."],
    "lang": ["en", "fr", "de", "en", "it", "no"],
}


def test_save_to_disk_directory_is_a_shard_and_bad_rows_are_rejects(tmp_path):
    shard = _save(tmp_path / "wiki", MIXED)
    assert {"state.json", "dataset_info.json"} <= set(os.listdir(shard))
    read = read_corpus_file(shard)
    assert read.docs.column("shard").to_pylist() == ["wiki", "wiki"]
    assert read.docs.column("doc_id").to_pylist() == ["a", "f"]
    assert read.docs.column("text").to_pylist() == ["Ada was born in Paris .", "Fay met Oslo ."]
    assert [json.loads(m) for m in read.docs.column("meta").to_pylist()] == [{"lang": "en"}, {"lang": "no"}]
    assert read.docs.column("source_line").to_pylist() == [1, 6]
    assert set(read.docs.column("source_file").to_pylist()) == {str(shard)}
    bad = _rejects(read)
    assert bad[2] == ("text", "empty or blank string")
    assert bad[3] == ("doc_id", "missing field")
    assert bad[4][0] == "doc_id" and "duplicate doc_id 'a'" in bad[4][1] and f"{shard}:1" in bad[4][1]
    assert bad[5] == ("text", "missing field")
    assert set(bad) == {2, 3, 4, 5}  # 2 kept + 4 rejected: every row accounted for
    assert set(read.rejects.column("file").to_pylist()) == {str(shard)}
    assert json.loads(read.rejects.to_pylist()[0]["raw"]) == {"doc_id": "b", "text": "  ", "lang": "fr"}


@pytest.mark.parametrize("kind", ["datasets-stream", "ipc-file"])
def test_arrow_file_is_a_shard(tmp_path, kind):
    path = tmp_path / "web.arrow"
    if kind == "datasets-stream":
        _arrow(path, MIXED)
    else:  # Feather v2 / Arrow IPC file, as pyarrow and pandas write it
        feather.write_feather(pa.table(MIXED), str(path), compression="uncompressed")
    read = read_corpus_file(path)
    assert read.docs.column("doc_id").to_pylist() == ["a", "f"]
    assert read.docs.column("shard").to_pylist() == ["web", "web"]
    assert set(_rejects(read)) == {2, 3, 4, 5}


def test_custom_text_and_id_columns(tmp_path):
    columns = CorpusColumns(text="content", id="uid")
    shard = _save(tmp_path / "books", {"uid": [7, 8, 7, None], "content": ["Bob met Rome .", "Cyd met Lima .", "dup", "x"],
                                       "author": ["b", "c", "d", "e"]})
    read = read_corpus_file(shard, columns=columns)
    assert read.docs.column("doc_id").to_pylist() == ["7", "8"]  # an integer id column: its decimal string
    assert read.docs.column("text").to_pylist() == ["Bob met Rome .", "Cyd met Lima ."]
    assert json.loads(read.docs.column("meta")[0].as_py()) == {"author": "b"}
    bad = _rejects(read)
    assert bad[3][0] == "uid" and "duplicate doc_id '7'" in bad[3][1]
    assert bad[4] == ("uid", "missing field")
    # the same settings name the fields of JSON Lines and Parquet shards
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"uid": "j1", "content": "Dee met Oslo .", "doc_id": "kept as metadata"}) + "\n"
                     + json.dumps({"uid": "j2", "text": "wrong field"}) + "\n")
    read = read_corpus_file(jsonl, columns=columns)
    assert read.docs.column("doc_id").to_pylist() == ["j1"]
    assert json.loads(read.docs.column("meta")[0].as_py()) == {"doc_id": "kept as metadata"}
    assert _rejects(read) == {2: ("content", "missing field")}
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"uid": ["p1"], "content": ["Eve met Paris ."]}), parquet)
    assert read_corpus_file(parquet, columns=columns).docs.column("doc_id").to_pylist() == ["p1"]


def test_ids_are_derived_when_there_is_no_id_column(tmp_path):
    shard = _save(tmp_path / "wiki", {"text": ["Ada met Lima .", "", "Bob met Rome ."], "url": ["u1", "u2", "u3"]})
    read = read_corpus_file(shard)
    assert read.docs.column("doc_id").to_pylist() == ["wiki:1", "wiki:3"]  # row numbers: stable, gaps kept
    assert json.loads(read.docs.column("meta")[0].as_py()) == {"url": "u1"}
    assert _rejects(read) == {2: ("text", "empty or blank string")}
    arrow = _arrow(tmp_path / "web.arrow", {"text": ["Cyd met Oslo ."]})
    assert read_corpus_file(arrow).docs.column("doc_id").to_pylist() == ["web:1"]


def test_a_text_column_of_another_type_rejects_every_row(tmp_path):
    read = read_corpus_file(_save(tmp_path / "nums", {"doc_id": ["a", "b"], "text": [1, 2]}))
    assert read.docs.num_rows == 0
    assert _rejects(read) == {1: ("text", "expected a string, got int"), 2: ("text", "expected a string, got int")}


@pytest.mark.parametrize("columns, setting, column", [
    (CorpusColumns(text="body"), "text_column", "body"),
    (CorpusColumns(id="uid"), "id_column", "uid"),
])
@pytest.mark.parametrize("fmt", ["dir", "arrow", "parquet"])
def test_a_missing_configured_column_is_an_error_naming_the_fix(tmp_path, columns, setting, column, fmt):
    cols = {"doc_id": ["a"], "text": ["Ada met Rome ."], "lang": ["en"]}
    if fmt == "dir":
        path = _save(tmp_path / "wiki", cols)
    elif fmt == "arrow":
        path = _arrow(tmp_path / "wiki.arrow", cols)
    else:
        path = tmp_path / "wiki.parquet"
        pq.write_table(pa.table(cols), path)
    with pytest.raises(InputError) as err:
        read_corpus_file(path, columns=columns)
    message = str(err.value)
    assert str(path) in message and repr(column) in message
    assert "'doc_id', 'text', 'lang'" in message and f"[inputs] {setting}" in message and "msif.toml" in message


def test_unreadable_datasets_are_file_level_rejects(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_info.json").write_text("{}")  # no state.json, no data
    corrupt = tmp_path / "corrupt.arrow"
    corrupt.write_bytes(b"\xff\xff\xff\xff not arrow at all")
    for path in (broken, corrupt):
        read = read_corpus_file(path)
        assert read.docs.num_rows == 0
        (reject,) = read.rejects.to_pylist()
        assert reject["line"] is None and reject["field"] == "<file>" and reject["file"] == str(path)
    assert "save_to_disk" in read_corpus_file(broken).rejects["reason"][0].as_py()


# --- streaming --------------------------------------------------------------------------------

def _write_large(root: Path, name: str, rows: int, fmt: str) -> Path:
    """A shard of ``rows`` ~0.5 KB documents, written batch by batch (never whole in memory)."""
    def batch(start: int, stop: int) -> dict:
        return {"doc_id": [f"d{i}" for i in range(start, stop)],
                "text": [f"document {i} " + "Ada met Paris in Oslo . " * 20 for i in range(start, stop)]}

    stream = root / f"{name}.arrow"
    with ArrowWriter(path=str(stream)) as writer:
        for start in range(0, rows, 1000):
            writer.write_batch(batch(start, min(rows, start + 1000)))
        writer.finalize()
    if fmt == "arrow":
        return stream
    dataset = datasets.Dataset.from_file(str(stream))
    if fmt == "dir":
        dataset.save_to_disk(str(root / name))
        return root / name
    path = root / f"{name}.parquet"
    with pq.ParquetWriter(path, dataset.data.schema) as writer:
        for part in dataset.data.table.to_batches(max_chunksize=1000):
            writer.write_batch(part)  # one row group per 1000 rows: Parquet's unit of reading
    return path


def _peak_bytes(path: Path) -> tuple[int, int]:
    """(rows read, peak Python heap + Arrow memory) while consuming the reader without keeping rows."""
    for _ in columnar_rows(path, batch_rows=256):  # warm up: imports and caches are not the shard's
        break
    tracemalloc.start()
    base, arrow_peak, rows = pa.total_allocated_bytes(), 0, 0
    for rows, _row in enumerate(columnar_rows(path, batch_rows=256), start=1):
        if rows % 32 == 0:
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - base)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return rows, python_peak + arrow_peak


@pytest.mark.parametrize("fmt", ["dir", "arrow", "parquet"])
def test_peak_memory_does_not_grow_with_the_shard(tmp_path, fmt):
    small = _write_large(tmp_path, "small", 1_000, fmt)
    large = _write_large(tmp_path, "large", 32_000, fmt)  # ~16 MB of text
    large_bytes = (tmp_path / "large.arrow").stat().st_size  # the data uncompressed (Parquet compresses it)
    n_small, peak_small = _peak_bytes(small)
    n_large, peak_large = _peak_bytes(large)
    assert (n_small, n_large) == (1_000, 32_000)
    # 32× the rows, about the same peak: one batch (and for Parquet one row group) at a time
    assert peak_large < 2 * peak_small + (1 << 20), (peak_small, peak_large)
    assert peak_large < large_bytes / 4, (peak_large, large_bytes)


def test_datasets_are_iterated_in_batches(tmp_path, monkeypatch):
    shard = _save(tmp_path / "wiki", {"doc_id": [f"d{i}" for i in range(10)], "text": ["Ada met Rome ."] * 10})
    seen: list[int] = []
    real_iter = datasets.Dataset.iter

    def spy(self, batch_size, drop_last_batch=False):
        for batch in real_iter(self, batch_size, drop_last_batch):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(datasets.Dataset, "iter", spy)
    rows = columnar_rows(shard, batch_rows=4)
    assert inspect.isgenerator(rows) and seen == []  # nothing is read before the first row is asked for
    assert [r.line for r in rows] == list(range(1, 11))
    assert seen == [4, 4, 2]


# --- the inbox --------------------------------------------------------------------------------

def test_inbox_reads_dataset_directories_and_reports_the_rest(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _save(inbox / "wiki", MIXED)
    _arrow(inbox / "web.arrow", {"text": ["Ada met Rome ."]})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(MIXED)}).save_to_disk(str(inbox / "splits"))
    (inbox / "plain").mkdir()
    leaky = _save(inbox / "leaky", MIXED)
    (tmp_path / "outside.json").write_text("{}")
    (leaky / "extra.json").symlink_to(tmp_path / "outside.json")
    scan = scan_inbox(inbox)
    assert scan.shards == {"web": [inbox / "web.arrow"], "wiki": [inbox / "wiki"]}
    (splits,) = [p for p in scan.ignored if "splits" in p]
    assert "DatasetDict" in splits and "save_to_disk" in splits
    assert sum("plain" in p for p in scan.ignored) == 1
    (leak,) = scan.refused["leaky"]
    assert "extra.json" in leak and "outside the inbox" in leak

    # a dataset directory's input is every file in it: changing one is a new version
    before_stat, before_digest = files_stat(scan.shards["wiki"]), files_digest(scan.shards["wiki"])
    assert "wiki/state.json" in before_stat
    _save(inbox / "wiki", {**MIXED, "lang": ["xx"] * 6})
    assert files_digest(scan.shards["wiki"]) != before_digest


def test_a_misconfigured_shard_fails_alone(tmp_path):
    """A shard missing the text column fails naming it; a shard named after it still ingests
    (it cannot hold the earlier shard's ids until that shard reads)."""
    inbox, layout, columns = tmp_path / "inbox", LakeLayout(tmp_path / "lake"), CorpusColumns(text="body")
    inbox.mkdir()
    _save(inbox / "a", {"doc_id": ["x"], "text": ["Ada met Rome ."]})
    (inbox / "b.jsonl").write_text(json.dumps({"doc_id": "x", "body": "Bob met Lima ."}) + "\n")
    with pytest.raises(InputError, match=r"column 'body' .*\[inputs\] text_column"):
        ingest_shard(layout, inbox, "a", columns)
    ingest_shard(layout, inbox, "b", columns)
    assert tables.read_docs(layout, "b").column("doc_id").to_pylist() == ["x"]
    # with the shard fixed, both read; the shard named first keeps the id
    _save(inbox / "a", {"doc_id": ["x"], "body": ["Ada met Rome ."]})
    ingest_shard(layout, inbox, "a", columns)
    ingest_shard(layout, inbox, "b", columns)
    assert tables.read_docs(layout, "a").column("doc_id").to_pylist() == ["x"]
    assert tables.read_docs(layout, "b").num_rows == 0
    assert tables.read_rejects(layout, corpus_reject_source("b")).column("field").to_pylist() == ["doc_id"]
