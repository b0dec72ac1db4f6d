"""Smoke test of ``bench/corpus_scale.py``: real sentence-transformer embeddings into a real
LanceDB table, KNN per query, one fresh process per corpus size. Timings are never asserted."""

from __future__ import annotations

import json

from bench.corpus_scale import main, synthetic_texts


def test_synthetic_corpus_is_deterministic_and_distinct():
    a, b = synthetic_texts(50, seed=0), synthetic_texts(50, seed=0)
    assert a == b and len(set(a)) == 50
    assert synthetic_texts(5, seed=1) != a[:5]


def test_scored_pairs_are_queries_times_k_whatever_the_corpus_size(tmp_path):
    out = tmp_path / "corpus.json"
    assert main(["--chunks", "40", "120", "--queries", "3", "--knn-k", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [c["chunks"] for c in result["cases"]] == [40, 120]
    for case in result["cases"]:
        assert case["candidate_pairs"] == 3 * 5 and 5 <= case["distinct_candidates"] <= 15
        assert case["peak_rss_mb"] > 0 and set(case["phases"]) == {"embed chunks", "lancedb write", "knn (embed queries + search)"}
    assert result["slopes"]["scored pairs"] == 0.0
