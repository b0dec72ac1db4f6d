"""Query blocks and low-rank query vectors through real materializations: scoring one block of
queries at a time gives the scores of one pass over all queries; full rank is exact, and a
rank-1 lake stores factors, not matrices."""

from __future__ import annotations

import dagster as dg
import pytest

from msif_assets.app import runner
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.factor_store import load_tensors
from msif_assets.pipeline import scoring

from .byo_world import byo_definitions, make_world

SQL = "SELECT query_id, chunk_id, method, damping_kind, damping, score, score_mlp, score_attn FROM influence ORDER BY ALL"


def _scores(root, inputs, name: str, **compute):
    lake_root = root / name
    defs = byo_definitions(lake_root, inputs, **{"all_chunks_below": 100, **compute})
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    runner.execute(defs, instance, runner.all_requests(defs, instance))
    with Catalog.open(lake_root / "lake") as catalog:
        return catalog.query(SQL).to_pylist(), lake_root / "lake"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    inputs = make_world(root, n_shards=1)
    return root, inputs, _scores(root, inputs, "one-block", query_batch_size=0)[0]


def _assert_same(got, want, rel=1e-4):
    """Float32 scores: a block of one query runs other GEMM shapes than a block of three, and the
    preconditioner at small damping amplifies their rounding to ~1e-5 of the largest score of the
    (query, method, damping) group (seen: 0.006 on scores up to ~260). A block that mixed up
    queries, chunks or keys would be off by the order of the scores themselves."""
    assert len(got) == len(want) > 0
    group = lambda r: (r["query_id"], r["method"], r["damping"])  # noqa: E731
    scale: dict = {}
    for w in want:
        scale[group(w)] = max(scale.get(group(w), 0.0), abs(w["score"]))
    for g, w in zip(got, want):
        assert {k: g[k] for k in ("query_id", "chunk_id", "method", "damping")} == {k: w[k] for k in ("query_id", "chunk_id", "method", "damping")}
        for column in ("score", "score_mlp", "score_attn"):
            assert (g[column] is None) == (w[column] is None)
            if g[column] is not None:
                assert g[column] == pytest.approx(w[column], rel=rel, abs=rel * max(1.0, scale[group(w)])), (w, column)


def test_blocks_of_one_query_score_like_one_pass(world):
    root, inputs, one_pass = world
    blocked, lake = _scores(root, inputs, "blocks", query_batch_size=1)
    _assert_same(blocked, one_pass)
    files = sorted((lake / "query_gradients").rglob("block=*.safetensors"))
    assert len({f.name for f in files}) == 3  # three queries, one block each


def test_a_block_runs_only_the_candidates_of_its_own_queries(world, monkeypatch):
    root, inputs, _ = world
    knn = {"all_chunks_below": 0, "knn_k": 3}  # candidates from LanceDB KNN: each query has its own three
    one_pass, _ = _scores(root, inputs, "knn-one-block", query_batch_size=0, **knn)
    runs: list[int] = []  # candidates in each forward+backward pass
    real = scoring.score_examples
    monkeypatch.setattr(scoring, "score_examples",
                        lambda model, specs, stacked, examples, *a: runs.append(len(examples)) or real(model, specs, stacked, examples, *a))
    blocked, _ = _scores(root, inputs, "knn-blocks", query_batch_size=1, **knn)
    _assert_same(blocked, one_pass)
    per_query = [len({r["chunk_id"] for r in one_pass if r["query_id"] == q}) for q in sorted({r["query_id"] for r in one_pass})]
    assert per_query == [3, 3, 3] and len({r["chunk_id"] for r in one_pass}) > 3, per_query
    assert runs == [3, 3] * 3, runs  # per block: θ_pt (MS-IF, GDP) then θ_ft (SS-IF), 3 chunks each — not the shard's union


def test_rank_one_stores_factors_and_changes_only_the_influence_methods(world):
    root, inputs, full = world
    low, lake = _scores(root, inputs, "rank-1", query_rank=1)
    tensors, _ = load_tensors(next((lake / "query_gradients").rglob("block=00000.safetensors")))
    assert any(name.endswith("::left") for name in tensors) and any(name.endswith("::right") for name in tensors)
    baselines = lambda rows: [r for r in rows if r["method"] in ("repsim", "bm25")]  # noqa: E731
    _assert_same(baselines(low), baselines(full))
    influence = [(a["score"], b["score"]) for a, b in zip(low, full) if a["method"] in ("ms-if", "ss-if", "gdp")]
    assert any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in influence)  # a real truncation


def test_a_block_that_cannot_fit_is_an_error_naming_the_setting(tmp_path, monkeypatch):
    from msif_assets.config import MsifConfig
    from msif_assets.pipeline import memory
    from msif_assets.pipeline.models import check_pair

    inputs = make_world(tmp_path, n_shards=1)
    defs = byo_definitions(tmp_path, inputs, all_chunks_below=100, query_batch_size=0)
    settings = MsifConfig(inputs=inputs, compute={"query_batch_size": 0}).compute
    one_query = memory.query_block_bytes(check_pair(inputs["pretrained_model"], inputs["finetuned_model"], settings), settings, 1)
    monkeypatch.setattr(memory, "available_bytes", lambda: int(1.5 * one_query / memory.HEADROOM))  # room for one query
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    with pytest.raises(RuntimeError, match=r"query_gradients: a block of 3 queries needs about .* set \[compute\] query_batch_size = 1"):
        runner.execute(defs, instance, runner.all_requests(defs, instance))
    assert not (tmp_path / "lake" / "query_gradients").exists()
