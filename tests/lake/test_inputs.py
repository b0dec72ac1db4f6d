import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msif_assets.lake.inputs import (
    InputError, find_cross_shard_duplicates, read_corpus_file, read_corpus_shard, shard_key_from_path,
)
from msif_assets.lake.training_inputs import read_finetune_file, read_queries_file
from msif_assets.lake.tables import DOCUMENTS, REJECTS


def _write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _reject_index(rejects: pa.Table) -> dict[int, tuple[str, str]]:
    return {r["line"]: (r["field"], r["reason"]) for r in rejects.to_pylist()}


def test_jsonl_bad_rows_become_rejects_with_line_and_field(tmp_path):
    f = _write_lines(tmp_path / "web.jsonl", [
        json.dumps({"doc_id": "a", "text": "good one", "url": "http://x", "n": 3}).encode(),  # 1 ok
        b'{"doc_id": "b", "text": ',                                                       # 2 malformed
        json.dumps({"text": "no id"}).encode(),                                           # 3 missing doc_id
        json.dumps({"doc_id": 5, "text": "int id"}).encode(),                             # 4 wrong type
        json.dumps({"doc_id": "c", "text": "   "}).encode(),                              # 5 blank text
        b'{"doc_id": "d", "text": "caf\xe9"}',                                             # 6 not UTF-8
        json.dumps({"doc_id": "a", "text": "dup"}).encode(),                              # 7 duplicate
        b"",                                                                               # 8 blank: skipped
        json.dumps(["not", "an", "object"]).encode(),                                     # 9 not an object
        json.dumps({"doc_id": "e", "text": "fine"}).encode(),                             # 10 ok
        json.dumps({"doc_id": "f"}).encode(),                                             # 11 missing text
    ])
    docs, rejects = read_corpus_file(f)
    assert docs.schema == DOCUMENTS.schema and rejects.schema == REJECTS.schema
    assert docs.column("doc_id").to_pylist() == ["a", "e"]
    assert docs.column("shard").to_pylist() == ["web", "web"]
    assert docs.column("source_line").to_pylist() == [1, 10]
    assert json.loads(docs.column("meta")[0].as_py()) == {"url": "http://x", "n": 3}
    bad = _reject_index(rejects)
    assert set(bad) == {2, 3, 4, 5, 6, 7, 9, 11}
    assert bad[2][0] == "<line>" and "malformed JSON" in bad[2][1]
    assert bad[3] == ("doc_id", "missing field")
    assert bad[4][0] == "doc_id" and "expected a string" in bad[4][1]
    assert bad[5][0] == "text" and "empty" in bad[5][1]
    assert bad[6][0] == "<line>" and "UTF-8" in bad[6][1]
    assert bad[7][0] == "doc_id" and "duplicate" in bad[7][1] and f"{f}:1" in bad[7][1]
    assert bad[9][0] == "<line>" and "JSON object" in bad[9][1]
    assert bad[11] == ("text", "missing field")
    assert set(rejects.column("file").to_pylist()) == {str(f)}
    assert set(rejects.column("source").to_pylist()) == {"corpus-web"}
    assert "caf\\xe9" in rejects.filter(pa.compute.equal(rejects["line"], 6))["raw"][0].as_py()


def test_txt_one_document_per_nonblank_line(tmp_path):
    f = _write_lines(tmp_path / "notes.txt", [b"first doc", b"", b"   ", b"third \xff bad", b"fifth\r"])
    docs, rejects = read_corpus_file(f, shard="s9")
    assert docs.column("doc_id").to_pylist() == ["notes:1", "notes:5"]
    assert docs.column("text").to_pylist() == ["first doc", "fifth"]
    assert rejects.num_rows == 1 and rejects["line"][0].as_py() == 4


def test_parquet_rows_validated_like_json(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"doc_id": ["x", None, "y", "x"], "text": ["t1", "t2", "", "t4"],
                             "lang": ["en", "en", "fr", "de"]}), f)
    docs, rejects = read_corpus_file(f)
    assert docs.column("doc_id").to_pylist() == ["x"]
    assert json.loads(docs["meta"][0].as_py()) == {"lang": "en"}
    bad = _reject_index(rejects)
    assert set(bad) == {2, 3, 4}
    assert bad[2] == ("doc_id", "missing field")
    assert bad[3] == ("text", "empty or blank string")
    assert bad[4][0] == "doc_id" and "duplicate" in bad[4][1]


def test_unreadable_parquet_is_a_file_level_reject(tmp_path):
    f = tmp_path / "broken.parquet"
    f.write_bytes(b"not parquet at all")
    docs, rejects = read_corpus_file(f)
    assert docs.num_rows == 0
    assert rejects.to_pylist()[0]["line"] is None and rejects["field"][0].as_py() == "<file>"


def test_duplicates_across_files_of_one_shard_and_across_shards(tmp_path):
    a = _write_lines(tmp_path / "a.jsonl", [json.dumps({"doc_id": "k", "text": "one"}).encode()])
    b = _write_lines(tmp_path / "b.jsonl", [json.dumps({"doc_id": "k", "text": "two"}).encode(),
                                            json.dumps({"doc_id": "m", "text": "three"}).encode()])
    docs, rejects = read_corpus_shard("s1", [a, b])
    assert docs.column("doc_id").to_pylist() == ["k", "m"]
    assert rejects.num_rows == 1 and rejects["file"][0].as_py() == str(b)
    other, _ = read_corpus_shard("s2", [b])
    dups = find_cross_shard_duplicates([docs, other])
    assert dups.to_pylist() == [{"doc_id": "k", "shards": ["s1", "s2"]}, {"doc_id": "m", "shards": ["s1", "s2"]}]
    assert find_cross_shard_duplicates(docs).num_rows == 0


def test_unsupported_suffix_and_unsafe_shard_name(tmp_path):
    with pytest.raises(InputError, match="unsupported suffix"):
        read_corpus_shard("s", [tmp_path / "x.csv"])
    with pytest.raises(InputError, match="file name"):
        shard_key_from_path(tmp_path / "my shard.jsonl")


def test_queries_reader(tmp_path):
    f = _write_lines(tmp_path / "q.jsonl", [
        json.dumps({"query_id": "q1", "prompt": "Capital of France?", "completion": " Paris",
                    "gold_doc_ids": ["d1"], "topic": "geo"}).encode(),
        json.dumps({"query_id": "q2", "prompt": "Say hi"}).encode(),
    ])
    table = read_queries_file(f)
    assert table.column("query_id").to_pylist() == ["q1", "q2"]
    assert table.column("completion").to_pylist() == [" Paris", None]
    assert table.column("gold_doc_ids").to_pylist() == [["d1"], None]
    assert json.loads(table["meta"][0].as_py()) == {"topic": "geo"}


@pytest.mark.parametrize("line, match", [
    ({"prompt": "p"}, r"q\.jsonl:2: query_id — missing field"),
    ({"query_id": "q1", "prompt": "p"}, r"q\.jsonl:2: query_id — duplicate 'q1' \(first on line 1\)"),
    ({"query_id": "q2", "prompt": ""}, r"q\.jsonl:2: prompt — empty"),
    ({"query_id": "q2", "prompt": "p", "completion": 3}, r"q\.jsonl:2: completion — expected a string"),
    ({"query_id": "q2", "prompt": "p", "gold_doc_ids": "d1"}, r"q\.jsonl:2: gold_doc_ids"),
])
def test_bad_query_rows_raise_with_location(tmp_path, line, match):
    f = _write_lines(tmp_path / "q.jsonl", [json.dumps({"query_id": "q1", "prompt": "ok"}).encode(),
                                            json.dumps(line).encode()])
    with pytest.raises(InputError, match=match):
        read_queries_file(f)


def test_malformed_query_json_and_empty_file(tmp_path):
    with pytest.raises(InputError, match=r"q\.jsonl:1: <line> — malformed JSON"):
        read_queries_file(_write_lines(tmp_path / "q.jsonl", [b"{oops"]))
    with pytest.raises(InputError, match="no queries"):
        read_queries_file(_write_lines(tmp_path / "e.jsonl", [b""]))


@pytest.mark.parametrize("rows, kind", [
    ([{"text": "hello"}, {"text": "world"}], "lm"),
    ([{"prompt": "Q", "completion": "A"}], "prompt_completion"),
    ([{"text": "good film", "label": 1}, {"text": "bad", "label": "neg"}], "classification"),
])
def test_finetune_forms(tmp_path, rows, kind):
    f = _write_lines(tmp_path / "ft.jsonl", [json.dumps(r).encode() for r in rows])
    data = read_finetune_file(f)
    assert data.kind == kind and data.table.num_rows == len(rows)
    if kind == "classification":
        assert data.table.column("label").to_pylist() == ["1", "neg"]


@pytest.mark.parametrize("rows, match", [
    ([{"text": "a"}, {"prompt": "q", "completion": "a"}], r"ft\.jsonl:2: <line> — this line is prompt_completion"),
    ([{"prompt": "q"}], r"ft\.jsonl:1: completion — missing field"),
    ([{"text": "x", "label": True}], r"ft\.jsonl:1: label — expected an integer"),
    ([{"foo": 1}], r"ft\.jsonl:1: text — no 'text'"),
    ([{"prompt": "q", "completion": "a", "text": "t"}], r"ft\.jsonl:1: text — ambiguous"),
])
def test_bad_finetune_rows_raise(tmp_path, rows, match):
    f = _write_lines(tmp_path / "ft.jsonl", [json.dumps(r).encode() for r in rows])
    with pytest.raises(InputError, match=match):
        read_finetune_file(f)
