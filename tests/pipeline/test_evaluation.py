"""The evaluation functions on hand-built tables: document scores, fact tracing under both
protocols, rerank pools, parameter proximity and MLP/attention shares."""

import datetime as dt
import math

import pyarrow as pa
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif_assets.engine import discover_modules
from msif_assets.engine.baselines import BM25Index
from msif_assets.pipeline import evaluation as ev
from msif_assets.pipeline import model_analysis as ma

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
