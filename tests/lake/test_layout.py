import pytest

from msif_assets.lake.layout import LakeLayout, PartitionKeyError, validate_key


def test_paths_follow_the_documented_layout(tmp_path):
    lake = LakeLayout(tmp_path)
    root = tmp_path.resolve()
    assert lake.shard_docs_file("s1") == root / "shards/s1/docs.parquet"
    assert lake.chunks_file("s1") == root / "chunks/shard=s1/part.parquet"
    assert lake.scores_file("abc", "s1") == root / "scores/model=abc/shard=s1/part.parquet"
    assert lake.rejects_file("corpus-s1") == root / "rejects/source=corpus-s1/part.parquet"
    assert lake.factors_file("pt", "h1") == root / "factors/pt/h1/factors.safetensors"
    assert lake.factor_stats_file("ft", "h2", "s3") == root / "factors/ft/h2/stats/shard=s3.safetensors"
    assert lake.query_gradients_file("p", "f", "ms-if", "rel-0.1", 3) == (
        root / "query_gradients/pt=p/ft=f/method=ms-if/damping=rel-0.1/block=00003.safetensors")
    assert lake.queries_file == root / "queries/queries.parquet"
    assert lake.candidates_file("s1") == root / "candidates/shard=s1/part.parquet"
    assert lake.eval_file("eval_summary") == root / "eval/eval_summary.parquet"
    assert lake.embeddings_dir == root / "embeddings"


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a b", ".hidden", "a..b", "x\\y", "é", "a" * 201, 7])
def test_unsafe_keys_are_refused(bad):
    with pytest.raises(PartitionKeyError):
        validate_key(bad, "shard")


@pytest.mark.parametrize("good", ["s1", "shard_001", "2024-01.part", "A-b_c.d"])
def test_safe_keys_pass(good):
    assert validate_key(good) == good


def test_no_method_builds_a_path_outside_root(tmp_path):
    lake = LakeLayout(tmp_path)
    with pytest.raises(PartitionKeyError):
        lake.scores_file("../../etc", "s1")
    with pytest.raises(PartitionKeyError):
        lake.shard_docs_file("..")
    with pytest.raises(PartitionKeyError):
        lake.factors_dir("xx", "h")  # type: ignore[arg-type]
