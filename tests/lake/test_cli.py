import csv
import io
import json

import pytest

from msif_assets.app.cli import build_parser, main


def test_sql_table_output(small_lake, capsys):
    code = main(["sql", "SELECT doc_id, rank, score FROM influence ORDER BY rank", "--lake", str(small_lake.root)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["doc_id", "rank", "score"]
    assert lines[2].split() == ["d1", "1", "3"]
    assert lines[-1] == "(4 rows)"


def test_sql_csv_and_json_formats(small_lake, capsys, monkeypatch):
    monkeypatch.setenv("MSIF_LAKE", str(small_lake.root))  # lake root from the environment
    assert main(["sql", "SELECT doc_id, shard FROM documents ORDER BY doc_id", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["doc_id"] for r in rows] == ["d1", "d2", "d3", "d4"]
    assert main(["sql", "SELECT count(*) AS n FROM chunks", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 4}]


def test_sql_refuses_writes_with_exit_code(small_lake, capsys):
    code = main(["sql", "DROP VIEW documents", "--lake", str(small_lake.root)])
    assert code == 2
    assert "read-only" in capsys.readouterr().err


def test_top_prints_ranked_chunks_with_text(small_lake, capsys):
    code = main(["top", "q1", "--k", "2", "--lake", str(small_lake.root)])
    out = capsys.readouterr().out
    assert code == 0
    assert "The capital of France is" in out
    body = out.splitlines()
    heading = body.index("== ms-if@rel:0.1: top 2 of 4 scored candidates ==")
    assert body[heading + 1].split()[:4] == ["rank", "share", "percentile", "score"]
    assert "Paris is the capital of France" in body[heading + 3]
    assert "The Eiffel tower is in Paris" in body[heading + 4]
    assert body[-1] == "(2 rows)"


def test_top_unknown_method_explains(small_lake, capsys):
    assert main(["top", "q1", "--method", "gdp", "--lake", str(small_lake.root)]) == 1
    assert "methods scored for it: ms-if" in capsys.readouterr().err


def test_status_lists_tables_and_partitions(small_lake, capsys):
    assert main(["status", "--lake", str(small_lake.root)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[3:-1]}
    assert rows["documents"].split()[1:3] == ["4", "2"]
    assert "shard=s1, shard=s2" in rows["chunks"]
    assert "model=ft0123abcd/shard=s1" in rows["influence"]
    assert rows["queries"].split()[1] == "1"


def test_registry_has_builtin_commands():
    parser = build_parser()
    for argv in (["sql", "SELECT 1"], ["top", "q"], ["queries"], ["status"]):
        assert callable(parser.parse_args(argv).handler)
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-command"])
