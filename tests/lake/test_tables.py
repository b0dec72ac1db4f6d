import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .lake_data import FT, NOW, chunks_table, docs_table, scores_table
from msif_assets.lake.tables import (
    CANDIDATES, REJECTS, SCORES, TableSchemaError, list_partitions, list_shards, read_chunks, read_docs,
    read_candidates, read_eval, read_rejects, read_scores, write_candidates, write_chunks, write_docs, write_eval,
    write_rejects, write_scores,
)


def test_docs_roundtrip_and_rerun_replaces(layout):
    write_docs(layout, "s1", docs_table("s1", {"a": "x", "b": "y"}))
    write_docs(layout, "s1", docs_table("s1", {"c": "z"}))
    assert read_docs(layout, "s1").column("doc_id").to_pylist() == ["c"]
    assert list_shards(layout) == ["s1"]


def test_hive_partition_omits_partition_column_and_reader_restores_it(layout):
    write_chunks(layout, "s1", chunks_table("s1", {"a": "one two", "b": "three"}))
    stored = pq.read_table(layout.chunks_file("s1"))
    assert "shard" not in stored.column_names
    back = read_chunks(layout, "s1")
    assert back.column("shard").to_pylist() == ["s1", "s1"]
    assert back.column("token_ids").to_pylist() == [[0, 1], [0]]


def test_scores_partition_rerun_never_duplicates(layout):
    scores = scores_table("s1", "q1", {"a": 1.0, "b": 2.0})
    write_scores(layout, FT, "s1", scores)
    write_scores(layout, FT, "s1", scores)
    assert read_scores(layout, FT, "s1").num_rows == 2
    assert list_partitions(layout.scores_dir) == [{"model": FT, "shard": "s1"}]


def test_schema_violations_are_refused(layout):
    good = scores_table("s1", "q1", {"a": 1.0})
    with pytest.raises(TableSchemaError, match="missing column 'score'"):
        write_scores(layout, FT, "s1", good.drop_columns(["score"]))
    with pytest.raises(TableSchemaError, match="unexpected columns"):
        write_scores(layout, FT, "s1", good.append_column("extra", pa.array([1])))
    with pytest.raises(TableSchemaError, match="shard"):
        write_scores(layout, FT, "s2", good)  # rows say s1, partition says s2
    with pytest.raises(TableSchemaError, match="ft_model"):
        write_scores(layout, "other", "s1", good)
    with pytest.raises(TableSchemaError, match="duplicate"):
        write_scores(layout, FT, "s1", pa.concat_tables([good, good]))
    nulls = good.set_column(good.schema.get_field_index("score"), "score", pa.array([None], pa.float64()))
    with pytest.raises(TableSchemaError, match="null"):
        write_scores(layout, FT, "s1", nulls)
    assert not layout.scores_file(FT, "s1").exists()


def test_candidates_source_values_checked(layout):
    row = {"query_id": "q", "doc_id": "d", "chunk_id": "d#0", "shard": "s", "source": "knn", "knn_distance": 0.5}
    write_candidates(layout, "s", pa.Table.from_pylist([row], schema=CANDIDATES.schema))
    assert read_candidates(layout, "s").to_pylist() == [row]
    with pytest.raises(TableSchemaError, match="unknown value"):
        write_candidates(layout, "s", pa.Table.from_pylist([{**row, "source": "magic"}], schema=CANDIDATES.schema))


def test_rejects_empty_write_clears_previous(layout):
    one = pa.Table.from_pylist([{"source": "corpus-s1", "file": "f", "line": 3, "field": "text",
                                 "reason": "missing field", "raw": "{}"}], schema=REJECTS.schema)
    write_rejects(layout, "corpus-s1", one)
    assert read_rejects(layout, "corpus-s1").num_rows == 1
    write_rejects(layout, "corpus-s1", REJECTS.schema.empty_table())
    assert read_rejects(layout, "corpus-s1").num_rows == 0


def test_eval_tables_known_names_only(layout):
    row = {"method": "ms-if", "damping": 0.1, "damping_kind": "relative", "metric": "mrr", "value": 0.5,
           "n_queries": 4, "ft_model": FT, "computed_at": NOW}
    write_eval(layout, "eval_summary", pa.Table.from_pylist([row]))
    assert read_eval(layout, "eval_summary").column("value").to_pylist() == [0.5]
    with pytest.raises(TableSchemaError, match="unknown evaluation table"):
        write_eval(layout, "whatever", pa.Table.from_pylist([row]))


def test_reading_missing_table_names_the_path(layout):
    with pytest.raises(FileNotFoundError, match="scores"):
        read_scores(layout, FT, "nope")
    assert SCORES.partition_by == ("shard",)
