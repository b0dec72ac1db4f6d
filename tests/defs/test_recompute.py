"""Every row of DESIGN.md's recompute table: materialize, change one input, tick the real
automation conditions, and assert exactly which assets and partitions ran."""

import json
from pathlib import Path

import dagster as dg
import pytest
from safetensors.torch import load_file, save_file

from msif_assets.app import runner

from .byo_world import byo_definitions, make_world, perturb, shard_docs, write_jsonl

SHARD_ASSETS = ("corpus_shards", "doc_chunks", "doc_embeddings", "pt_covariance", "pt_lambda", "candidates", "influence_scores")
FACTOR_SET = ["shard-0", "shard-1"]
# summaries downstream of the scores (and, for proximity, of the two models)
SCORE_EVALS = {("fact_tracing_eval", None), ("influence_share", None)}
MODEL_EVALS = {("param_proximity", None)}


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    inputs = make_world(root)
    defs = byo_definitions(root, inputs, factor_shards=FACTOR_SET)
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    full = runner.execute(defs, instance, runner.all_requests(defs, instance))
    _, cursor = runner.refresh(defs, instance, None)  # first tick: settles the cursor
    state = {"root": root, "inputs": inputs, "defs": defs, "instance": instance, "cursor": cursor, "full": full}
    yield state


def _refresh(lake, defs=None):
    defs = defs or lake["defs"]
    runner.register_shards(lake["instance"], lake["inputs"]["inbox"])
    runner.observe_inputs(defs, lake["instance"])
    ran, lake["cursor"] = runner.refresh(defs, lake["instance"], lake["cursor"])
    return ran.keys()


def _data_version(lake, key: str) -> str:
    record = lake["instance"].fetch_materializations(dg.AssetKey(key), limit=1).records[0]
    return record.asset_materialization.tags["dagster/data_version"]


def _all_shards(lake, *assets):
    shards = lake["instance"].get_dynamic_partitions("shards")
    return {(a, s) for a in assets for s in shards}


def test_full_run_materializes_every_partition(lake):
    executed = lake["full"].keys()
    assert {("influence_scores", "shard-0"), ("influence_scores", "shard-1"), ("pt_factors", None), ("ft_factors", None)} <= executed


def test_nothing_changed_recomputes_nothing(lake):
    assert _refresh(lake) == set()


def test_new_shard_recomputes_only_that_shard(lake):
    before = {k: _data_version(lake, k) for k in ("pt_eigenbasis", "pt_factors")}
    write_jsonl(Path(lake["inputs"]["inbox"]) / "shard-2.jsonl", shard_docs(2))
    ran = _refresh(lake)
    # shard-2 is outside the factor set: its factor steps only write a constant marker. The
    # marker's first appearance makes the two merge steps re-merge the unchanged factor set;
    # they produce identical content (same data version), so nothing downstream runs.
    assert ran == {(a, "shard-2") for a in SHARD_ASSETS} | {("pt_eigenbasis", None), ("pt_factors", None)} | SCORE_EVALS
    assert {k: _data_version(lake, k) for k in before} == before


def test_new_queries_recompute_queries_gradients_candidates_scores(lake):
    path = Path(lake["inputs"]["queries"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [{**r, "completion": r.get("completion") or " Rome"} for r in rows] + [
        {"query_id": "q-hal", "prompt": "Where was Hal born ?", "completion": " Lima"}
    ]
    write_jsonl(path, rows)
    ran = _refresh(lake)
    assert ran == {("queries", None), ("query_gradients", None)} | _all_shards(lake, "candidates", "influence_scores") | SCORE_EVALS


def test_finetuned_model_change_never_touches_embeddings_or_pt_factors(lake):
    perturb(Path(lake["inputs"]["pretrained_model"]), Path(lake["inputs"]["finetuned_model"]), seed=7)
    ran = _refresh(lake)
    # `queries` re-reads the file (a generated completion would change); its output is
    # identical here, so candidates are not recomputed.
    assert ran == {("ft_factors", None), ("queries", None), ("query_gradients", None)} | _all_shards(lake, "influence_scores") | SCORE_EVALS | MODEL_EVALS


def test_pretrained_model_change_keeps_chunks_and_embeddings(lake):
    weights = Path(lake["inputs"]["pretrained_model"]) / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "dense_h_to_4h.weight" in k)
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    ran = _refresh(lake)
    # every shard's factor steps run; shard-2 (outside the factor set) only re-writes its marker
    factor_steps = _all_shards(lake, "pt_covariance", "pt_lambda")
    assert ran == factor_steps | {("pt_eigenbasis", None), ("pt_factors", None), ("query_gradients", None)} | _all_shards(lake, "influence_scores") | SCORE_EVALS | MODEL_EVALS


def test_damping_change_recomputes_gradients_and_scores_only(lake):
    defs = byo_definitions(lake["root"], lake["inputs"], factor_shards=FACTOR_SET, dampings=["rel:0.1", "abs:0.01"])
    ran = _refresh(lake, defs)
    assert ran == {("query_gradients", None)} | _all_shards(lake, "influence_scores") | SCORE_EVALS
    lake["defs"] = defs


def test_reruns_never_duplicate_rows(lake):
    from msif_assets.lake.catalog import Catalog

    defs, instance = lake["defs"], lake["instance"]
    runner.execute(defs, instance, {dg.AssetKey("influence_scores"): {"shard-0"}})
    catalog = Catalog.open(lake["root"] / "lake")
    dupes = catalog.query(
        "SELECT count(*) - count(DISTINCT (ft_model, pt_model, query_id, chunk_id, method, damping_kind, damping)) AS d FROM influence"
    ).column("d")[0].as_py()
    assert dupes == 0
    methods = {r["method"] for r in catalog.query("SELECT DISTINCT method FROM influence").to_pylist()}
    assert methods == {"ms-if", "ss-if", "gdp", "repsim", "bm25"}
