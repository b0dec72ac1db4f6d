import numpy as np
import pyarrow as pa
import pytest

from msif_assets.lake.vectors import ChunkVectorStore, VectorStoreError, with_vectors


def _unit(rng, n, d=16):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _shard(shard, vectors, texts=None):
    n = len(vectors)
    table = pa.table({
        "shard": [shard] * n,
        "chunk_id": [f"{shard}-d{i}#0" for i in range(n)],
        "doc_id": [f"{shard}-d{i}" for i in range(n)],
        "text": texts or [f"text {i}" for i in range(n)],
    })
    return with_vectors(table, vectors)


@pytest.fixture
def store(tmp_path):
    return ChunkVectorStore(tmp_path / "embeddings")


def test_empty_store(store):
    assert store.count() == 0 and store.dimension() is None
    assert store.knn(np.zeros((1, 4), np.float32), 3).num_rows == 0


def test_replace_shard_is_idempotent_and_shard_scoped(store):
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 30), _unit(rng, 10)
    store.replace_shard("a", _shard("a", a))
    store.replace_shard("b", _shard("b", b))
    store.replace_shard("a", _shard("a", a))
    store.replace_shard("a", _shard("a", a))
    assert (store.count(), store.count("a"), store.count("b")) == (40, 30, 10)
    assert store.dimension() == 16 and store.shards() == ["a", "b"]
    store.replace_shard("a", _shard("a", a[:5]))  # a smaller shard drops the rest of its rows
    assert (store.count("a"), store.count("b")) == (5, 10)


def test_empty_shard_clears_its_rows(store):
    rng = np.random.default_rng(4)
    empty = _shard("a", _unit(rng, 1)).slice(0, 0)
    assert store.replace_shard("a", empty) == 0 and store.count() == 0  # fresh store: no-op
    store.replace_shard("a", _shard("a", _unit(rng, 3)))
    store.replace_shard("b", _shard("b", _unit(rng, 2)))
    store.replace_shard("a", empty)
    assert (store.count("a"), store.count("b")) == (0, 2)


def test_knn_returns_true_nearest_by_cosine(store):
    rng = np.random.default_rng(1)
    a, b = _unit(rng, 50), _unit(rng, 20)
    store.replace_shard("a", _shard("a", a))
    store.replace_shard("b", _shard("b", b))
    queries = _unit(rng, 3)
    result = store.knn(queries, k=5)
    every = np.concatenate([a, b])
    ids = [f"a-d{i}#0" for i in range(50)] + [f"b-d{i}#0" for i in range(20)]
    for qi in range(3):
        dist = 1.0 - every @ queries[qi]
        expected = [ids[i] for i in np.argsort(dist)[:5]]
        rows = [r for r in result.to_pylist() if r["query_idx"] == qi]
        assert [r["chunk_id"] for r in rows] == expected
        np.testing.assert_allclose([r["distance"] for r in rows], np.sort(dist)[:5], atol=1e-5)
    only_b = store.knn(queries[:1], k=3, shards=["b"])
    assert set(only_b.column("shard").to_pylist()) == {"b"}
    exact_b = [f"b-d{i}#0" for i in np.argsort(1.0 - b @ queries[0])[:3]]
    assert only_b.column("chunk_id").to_pylist() == exact_b


def test_full_text_search_finds_matching_chunks(store):
    rng = np.random.default_rng(2)
    texts = ["the eiffel tower in paris", "bananas are yellow", "paris is the capital of france"]
    store.replace_shard("a", _shard("a", _unit(rng, 3), texts))
    hits = store.fts(["paris"], k=5)
    assert set(hits.column("chunk_id").to_pylist()) == {"a-d0#0", "a-d2#0"}
    store.replace_shard("b", _shard("b", _unit(rng, 1), ["paris again"]))  # added after the index
    assert "b-d0#0" in store.fts(["paris"], k=5).column("chunk_id").to_pylist()
    assert store.fts(["paris"], k=5, shards=["b"]).column("chunk_id").to_pylist() == ["b-d0#0"]


def test_inconsistent_data_refused(store):
    rng = np.random.default_rng(3)
    store.replace_shard("a", _shard("a", _unit(rng, 2)))
    with pytest.raises(VectorStoreError, match="dimension"):
        store.replace_shard("b", _shard("b", _unit(rng, 2, d=8)))
    with pytest.raises(VectorStoreError, match="other shards"):
        store.replace_shard("c", _shard("a", _unit(rng, 2)))
    dup = pa.concat_tables([_shard("d", _unit(rng, 1)), _shard("d", _unit(rng, 1))])
    with pytest.raises(VectorStoreError, match="duplicate"):
        store.replace_shard("d", dup)
    assert store.count() == 2
