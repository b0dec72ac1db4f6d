"""The evaluation assets: one real materialization on the user-brought world, its tables,
views, plot and metadata, and what refreshes when nothing or the labels change (the functions
themselves: tests/pipeline/test_evaluation.py)."""

import json
import math
from pathlib import Path

import dagster as dg
import pytest
from safetensors.torch import load_file

from msif_assets.app import runner
from msif_assets.defs.evaluation import EVAL_ASSETS, build_ekfac_fidelity
from msif_assets.lake import tables
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.layout import LakeLayout
from msif_assets.pipeline import evaluation as ev
from msif_assets.pipeline import fidelity_eval as fe

from .byo_world import byo_definitions, make_world, write_jsonl

# ---------------------------------------------------------------- materialization

GOLD_LABELS = {"q-eve": ["s0-d4"], "q-fay": ["s0-d5", "s1-d5"]}
SMALL_FIDELITY = fe.FIDELITY_SIZES["small"]  # n_train=8, n_queries=2, dampings (1e-3, 1e-1)


def _with_eval_assets(defs: dg.Definitions) -> dg.Definitions:
    fidelity = build_ekfac_fidelity(SMALL_FIDELITY)
    have = {k for a in defs.assets for k in getattr(a, "keys", [getattr(a, "key", None)])}
    extra = [a for a in EVAL_ASSETS if a.key not in have and a.key != fidelity.key]
    assets = [a for a in defs.assets if getattr(a, "key", None) != fidelity.key] + extra + [fidelity]
    return dg.Definitions(assets=assets, asset_checks=defs.asset_checks, resources=defs.resources)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    inputs = make_world(root)
    path = Path(inputs["queries"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, [{**r, "gold_doc_ids": GOLD_LABELS[r["query_id"]]} if r["query_id"] in GOLD_LABELS else r for r in rows])
    defs = _with_eval_assets(byo_definitions(root, inputs, all_chunks_below=100, dampings=["rel:0.1", "rel:1.0"]))
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    runner.execute(defs, instance, runner.all_requests(defs, instance))
    return {"root": root, "inputs": inputs, "defs": defs, "instance": instance, "lake": root / "lake"}


def _metadata(world, key: str) -> dict:
    record = world["instance"].fetch_materializations(dg.AssetKey(key), limit=1).records[0]
    return record.asset_materialization.metadata


def test_fact_tracing_tables_views_and_plot(world):
    layout = LakeLayout(world["lake"])
    with Catalog.open(world["lake"]) as catalog:
        summary = catalog.query("SELECT * FROM fact_tracing").to_pylist()
        long = catalog.query("SELECT count(*) AS n FROM eval_summary").column("n")[0].as_py()
        docs = catalog.query("SELECT count(DISTINCT doc_id) AS n FROM documents").column("n")[0].as_py()
    methods = {(r["method"], r["damping"]) for r in summary}
    assert methods == {("ms-if", 0.1), ("ms-if", 1.0), ("ss-if", 0.1), ("ss-if", 1.0), ("gdp", None), ("repsim", None), ("bm25", None)}
    assert {r["protocol"] for r in summary} == {"full", "rerank"} and all(r["n_queries"] == 2 for r in summary)
    assert len(summary) == 2 * len(methods) and long == len(summary) * len(ev.SUMMARY_METRICS)
    for protocol in ev.PROTOCOLS:
        ranking = tables.read_eval(layout, ev.RANKING_TABLES[protocol]).to_pylist()
        assert len(ranking) == 2 * len(methods)
        assert all(0 <= r["reciprocal_rank"] <= 1 and r["n_candidates"] <= docs for r in ranking)
    # the world is tiny (18 documents), so every document is in the rerank pool, and both
    # protocols agree — a real check that pools only hold scored documents
    pools = tables.read_eval(layout, "fact_tracing_pools").to_pylist()
    assert all(p["n_pool"] == p["n_eligible"] == docs for p in pools)
    meta = _metadata(world, "fact_tracing_eval")
    png = Path(meta["plot_path"].value)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.parent == layout.eval_dir
    assert meta["plot"].value.startswith("![fact tracing](data:image/png;base64,")
    assert meta["queries_with_gold"].value == 2


def test_fidelity_proximity_and_share_tables(world):
    with Catalog.open(world["lake"]) as catalog:
        fidelity = catalog.query("SELECT method, damping, spearman, pearson, n_pairs FROM eval_fidelity").to_pylist()
    methods = ("exact", "exact-blockdiag", "gdp", "ekfac", "ekfac-unsplit", "ekfac-mlp")
    assert {(r["method"], r["damping"]) for r in fidelity} == {(m, d) for m in methods for d in SMALL_FIDELITY.dampings}
    assert all(r["n_pairs"] == 8 * 2 and -1 <= r["spearman"] <= 1 for r in fidelity)
    assert all(r["spearman"] == pytest.approx(1.0) for r in fidelity if r["method"] == "exact")
    layout = LakeLayout(world["lake"])
    proximity = {r["scope"]: r for r in tables.read_eval(layout, "param_proximity").to_pylist()}
    pt = load_file(Path(world["inputs"]["pretrained_model"]) / "model.safetensors")
    ft = load_file(Path(world["inputs"]["finetuned_model"]) / "model.safetensors")
    diff = math.sqrt(sum(float(((ft[k].double() - pt[k].double()) ** 2).sum()) for k in pt))
    pt_norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in pt.values()))
    assert proximity["all-shared"]["relative_distance"] == pytest.approx(diff / pt_norm, rel=1e-5)
    shares = tables.read_eval(layout, "influence_share").to_pylist()
    assert {r["method"] for r in shares} == {"ms-if", "ss-if", "gdp"}
    assert all(r["influence_share_mlp"] + r["influence_share_attn"] == pytest.approx(1.0) for r in shares)
    assert "| method |" in _metadata(world, "ekfac_fidelity")["table"].value


def test_unchanged_world_requests_no_evaluation(world):
    _, cursor = runner.refresh(world["defs"], world["instance"], None)
    runner.observe_inputs(world["defs"], world["instance"])
    requests, _ = runner.automation_tick(world["defs"], world["instance"], cursor)
    assert requests == {}


def test_without_gold_labels_fact_tracing_is_skipped_and_cleared(world):
    path = Path(world["inputs"]["queries"])
    write_jsonl(path, [{k: v for k, v in json.loads(line).items() if k != "gold_doc_ids"} for line in path.read_text().splitlines()])
    runner.observe_inputs(world["defs"], world["instance"])
    runner.execute(world["defs"], world["instance"], {dg.AssetKey("queries"): {None}, dg.AssetKey("fact_tracing_eval"): {None}})
    assert _metadata(world, "fact_tracing_eval")["skipped"].value == "no query has gold_doc_ids"
    with Catalog.open(world["lake"]) as catalog:
        assert catalog.query("SELECT count(*) AS n FROM fact_tracing").column("n")[0].as_py() == 0
    assert not (LakeLayout(world["lake"]).eval_dir / "fact_tracing.png").exists()
