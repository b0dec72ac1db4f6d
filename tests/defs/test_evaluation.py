"""The evaluation step: document scores, fact tracing under both protocols, rerank pools,
proximity, MLP/attention shares, fidelity — unit tests on hand-built tables, then one real
materialization of the evaluation assets on the user-brought world."""

import datetime as dt
import json
import math
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif_assets.defs import runner
from msif_assets.defs.evaluation import EVAL_ASSETS, build_ekfac_fidelity
from msif_assets.engine import discover_modules
from msif_assets.engine.baselines import BM25Index
from msif_assets.lake import tables
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.layout import LakeLayout
from msif_assets.pipeline import evaluation as ev
from msif_assets.pipeline import fidelity_eval as fe
from msif_assets.pipeline import model_analysis as ma

from .byo_world import byo_definitions, make_world, write_jsonl

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def _chunk_rows(scores: dict[str, list[float]], method="ms-if", kind="relative", damping=0.1, query="q1"):
    return [{"query_id": query, "doc_id": d, "chunk_id": f"{d}#{i}", "method": method, "damping_kind": kind,
             "damping": damping, "score": s} for d, chunk_scores in scores.items() for i, s in enumerate(chunk_scores)]


def _expected(doc_score: dict[str, float], gold: set[str]) -> dict:
    """Ranks by counting (1 + documents strictly ahead: higher score, or equal score and smaller id)."""
    rank = {d: 1 + sum(1 for e, t in doc_score.items() if t > s or (t == s and e < d)) for d, s in doc_score.items()}
    gold_ranks = sorted(rank[g] for g in gold if g in rank)
    return {"first_gold_rank": gold_ranks[0] if gold_ranks else None,
            "reciprocal_rank": 1 / gold_ranks[0] if gold_ranks else 0.0,
            "recall_any_at_10": float(any(r <= 10 for r in gold_ranks)),
            "recall_frac_at_10": sum(r <= 10 for r in gold_ranks) / len(gold)}


# 14 documents; d03 and d11 are gold; d05 has three chunks, d07 ties with gold d03 on its max.
CHUNKS = {f"d{i:02d}": [((i * 7) % 13) / 10.0 - 0.3] for i in range(14)}
CHUNKS["d05"] = [-2.0, 0.95, 0.1]
CHUNKS["d07"] = [0.2, CHUNKS["d03"][0]]
CHUNKS["d11"] = [-5.0, -4.0]
GOLD = {"d03", "d11"}


def test_document_score_is_the_max_over_its_chunks():
    table = ev.document_scores(pa.Table.from_pylist(_chunk_rows(CHUNKS)))
    assert table.num_rows == len(CHUNKS)
    got = dict(zip(table.column("doc_id").to_pylist(), table.column("score").to_pylist()))
    assert got == {d: max(s) for d, s in CHUNKS.items()}


def test_full_protocol_metrics_match_ranks_counted_by_hand():
    rows = _chunk_rows(CHUNKS) + _chunk_rows({d: [-s for s in c] for d, c in CHUNKS.items()}, method="bm25", kind=None, damping=None)
    rows += _chunk_rows({"d99": [9.0]}, method="bm25", kind=None, damping=None)  # scored by one method only: not eligible
    queries = pa.Table.from_pylist([{"query_id": "q1", "prompt": "p", "completion": " c", "gold_doc_ids": sorted(GOLD)},
                                    {"query_id": "q2", "prompt": "p", "completion": " c", "gold_doc_ids": None}])
    result = ev.fact_tracing(ev.document_scores(pa.Table.from_pylist(rows)), queries, {}, "ft", computed_at=NOW)
    full = {r["method"]: r for r in result.rankings["full"].to_pylist()}
    assert set(full) == {"ms-if", "bm25"}  # q2 has no gold labels: no rows
    for method, sign in (("ms-if", 1), ("bm25", -1)):
        doc_score = {d: max(sign * s for s in c) for d, c in CHUNKS.items()}
        expected = _expected(doc_score, GOLD)
        assert {k: full[method][k] for k in expected} == pytest.approx(expected)
        assert full[method]["n_candidates"] == len(CHUNKS) and full[method]["n_gold"] == 2
    # one query, so the summary mean is that query's value
    summary = {(r["method"], r["metric"]): r["value"] for r in result.summary.to_pylist()}
    assert summary[("ms-if", "full/mrr")] == pytest.approx(full["ms-if"]["reciprocal_rank"])


def test_gold_document_without_scores_is_a_miss():
    scores = {"a": [0.3], "b": [0.2]}
    metrics = ev.rank_metrics({d: max(s) for d, s in scores.items()}, scores, {"b", "missing"})
    assert metrics["first_gold_rank"] == 2 and metrics["recall_frac_at_10"] == 0.5


def test_contains_answer_is_whole_word_and_case_insensitive():
    assert ev.contains_answer("Born in paris, France.", " Paris")
    assert not ev.contains_answer("A Parisian café.", "Paris")
    assert not ev.contains_answer("anything", "  ")


CITIES = ["Oslo", "Lima", "Rome", "Kyiv"]


def _corpus(n=520):
    """Half the documents (even numbers) name Paris, the query's answer."""
    city = lambda i: "Paris" if i % 2 == 0 else CITIES[i % 4]  # noqa: E731
    return {f"doc{i:03d}": f"person{i % 37} lived in {city(i)} near river{i % 11} and hill{i % 7}" for i in range(n)}


def _pool(seed=0, gold=frozenset({"doc000", "doc005"}), eligible=None, docs=None):
    docs = docs or _corpus()
    ids = sorted(docs)
    index = BM25Index.build([docs[d] for d in ids], ids)
    eligible = set(ids) if eligible is None else eligible
    return ev.rerank_pool("q1", "person0 lived in Paris near river0", " Paris", set(gold), eligible, docs, index,
                          ev.RerankConfig(seed=seed)), docs, index


def test_rerank_pool_composition():
    pool, docs, index = _pool()
    gold = {"doc000", "doc005"}
    assert set(pool.gold) == gold and gold <= pool.members
    parts = [set(pool.gold), set(pool.bm25), set(pool.same_answer), set(pool.random)]
    assert sum(map(len, parts)) == len(pool.members)  # disjoint
    assert len(pool.bm25) == len(pool.same_answer) == len(pool.random) == 100
    assert len(pool.members) <= 300 + len(gold)
    assert all("paris" in docs[d].lower() and d not in gold for d in pool.same_answer)
    # the BM25 part is the best-scoring non-gold documents
    bm25 = dict(zip(index.ids, index.scores("person0 lived in Paris near river0")))
    worst_taken = min(bm25[d] for d in pool.bm25)
    assert worst_taken > 0 and all(bm25[d] <= worst_taken for d in set(docs) - gold - set(pool.bm25))


def test_rerank_pool_is_seeded_and_stays_inside_the_eligible_documents():
    first, docs, _ = _pool(seed=3)
    assert _pool(seed=3)[0] == first
    assert _pool(seed=4)[0].random != first.random
    eligible = {d for d in docs if int(d[3:]) % 3 == 0}  # doc005 (gold) is not scored
    small = _pool(eligible=eligible)[0]
    assert small.members <= eligible and set(small.gold) == {"doc000"} and small.n_eligible == len(eligible)


def _tiny_neox(seed=0):
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=16, max_position_embeddings=12))


def test_parameter_proximity_against_a_known_perturbation():
    pt = _tiny_neox()
    ft = _tiny_neox()
    ft.load_state_dict(pt.state_dict())
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    delta = 0.05 * torch.randn(dict(ft.named_parameters())[name].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dict(ft.named_parameters())[name].add_(delta)
    specs = discover_modules(pt, "all")
    rows = {r.scope: r for r in ma.parameter_proximity(pt, ft, specs)}
    params = dict(pt.named_parameters())
    tracked = [p for n, p in params.items() if n.rsplit(".", 1)[0] in {s.name for s in specs}]
    assert rows["tracked-attn"].relative_distance == 0.0
    norm = lambda ps: math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in ps))  # noqa: E731
    assert rows["tracked"].relative_distance == pytest.approx(float(delta.norm()) / norm(tracked), rel=1e-6)
    assert rows["all-shared"].relative_distance == pytest.approx(float(delta.norm()) / norm(params.values()), rel=1e-6)
    assert rows["tracked"].n_params == sum(p.numel() for p in tracked)


def test_influence_shares_from_group_scores():
    rows = [{"method": "ms-if", "damping_kind": "relative", "damping": 0.1, "score_mlp": m, "score_attn": a}
            for m, a in ((3.0, -1.0), (-1.0, 1.0))]
    rows += [{"method": "bm25", "damping_kind": None, "damping": None, "score_mlp": None, "score_attn": None}]
    out = ma.influence_shares(pa.Table.from_pylist(rows), {"mlp": 30, "attn": 10})
    assert len(out) == 1 and out[0]["method"] == "ms-if" and out[0]["n_pairs"] == 2
    assert out[0]["influence_share_mlp"] == pytest.approx(4 / 6) and out[0]["param_share_attn"] == pytest.approx(0.25)
    pt = _tiny_neox()
    counts = ma.tracked_parameter_counts(discover_modules(pt, "all"))
    by_group = {"mlp": 0, "attn": 0}
    for spec in discover_modules(pt, "all"):
        by_group[spec.group] += sum(p.numel() for p in dict(pt.named_modules())[spec.name].parameters())
    assert counts == by_group


# ---------------------------------------------------------------- materialization

GOLD_LABELS = {"q-eve": ["s0-d4"], "q-fay": ["s0-d5", "s1-d5"]}
SMALL_FIDELITY = fe.FidelityConfig(n_train=8, train_steps=20, n_queries=2, dampings=(1e-3, 1e-1), fisher_repeats=1)


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
