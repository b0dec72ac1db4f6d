"""Tests for fact-tracing, correlation, distance and influence-share metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msif_assets.engine.metrics import (
    influence_share,
    pearson,
    rank_by_score,
    recall_at_k_any,
    recall_at_k_fraction,
    reciprocal_rank,
    relative_distance,
    spearman,
)

# ------------------------------------------------------------------ fact tracing


def test_reciprocal_rank_first_gold():
    ranked = ["a", "b", "c", "d", "e"]
    assert reciprocal_rank(ranked, {"d", "c"}) == 1 / (ranked.index("c") + 1)
    assert reciprocal_rank(ranked, {"a"}) == 1.0
    assert reciprocal_rank(ranked, {"zz"}) == 0.0


def test_reciprocal_rank_rejects_bad_input():
    with pytest.raises(ValueError, match="gold set is empty"):
        reciprocal_rank(["a"], set())
    with pytest.raises(ValueError, match="duplicate"):
        reciprocal_rank(["a", "b", "a"], {"b"})


def test_recall_variants():
    ranked = [f"d{i}" for i in range(20)]
    gold = {"d3", "d12", "unranked"}
    assert recall_at_k_any(ranked, gold, k=10) == 1.0
    assert recall_at_k_fraction(ranked, gold, k=10) == pytest.approx(1 / 3)
    assert recall_at_k_fraction(ranked, gold, k=13) == pytest.approx(2 / 3)
    assert recall_at_k_any(ranked, {"d10", "d11"}, k=10) == 0.0
    assert recall_at_k_fraction(ranked, {"d10", "d11"}, k=10) == 0.0
    # Denominator is |gold|, not min(|gold|, k): 12 gold docs at the top give 10/12 at k=10.
    many = {f"d{i}" for i in range(12)}
    assert recall_at_k_fraction(ranked, many, k=10) == pytest.approx(10 / 12)
    assert recall_at_k_any(ranked, many, k=10) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k_any(ranked, gold, k=0)


# ----------------------------------------------------------------------- ranking


def test_rank_by_score_descending_ascending_and_ties():
    ids = ["c", "a", "d", "b", "e"]
    scores = [0.5, 2.0, 0.5, -1.0, 0.5]
    # Groups by score, each group sorted by id.
    assert rank_by_score(ids, scores) == ["a", "c", "d", "e", "b"]
    assert rank_by_score(ids, scores, descending=False) == ["b", "c", "d", "e", "a"]


def test_rank_by_score_is_independent_of_input_order():
    rng = np.random.default_rng(0)
    ids = [f"doc{i:03d}" for i in range(50)]
    scores = rng.integers(0, 5, size=50).astype(float)  # many ties
    expected = rank_by_score(ids, scores)
    perm = rng.permutation(50)
    assert rank_by_score([ids[i] for i in perm], torch.tensor(scores[perm])) == expected
    # Scores are non-increasing along the ranking.
    lookup = dict(zip(ids, scores))
    assert all(lookup[a] >= lookup[b] for a, b in zip(expected, expected[1:]))


def test_rank_by_score_errors():
    with pytest.raises(ValueError, match="2 ids but 3 scores"):
        rank_by_score(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        rank_by_score(["a", "b"], [1.0, float("nan")])
    with pytest.raises(ValueError, match="duplicates"):
        rank_by_score(["a", "a"], [1.0, 2.0])


# ------------------------------------------------------------------ correlations


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks for tie-free data, built explicitly."""
    r = np.empty(len(x))
    r[np.argsort(x)] = np.arange(1, len(x) + 1)
    return r


def test_spearman_and_pearson_match_hand_computation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = x**3 + 0.5 * rng.normal(size=30)
    xc, yc = x - x.mean(), y - y.mean()
    assert pearson(x, y) == pytest.approx((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)), abs=1e-12)
    rx, ry = _ranks(x), _ranks(y)
    d = rx - ry
    n = len(x)
    assert spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (n * (n * n - 1)), abs=1e-12)
    # Monotone transform: Spearman is exactly 1, Pearson is not.
    assert spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert pearson(x, np.exp(3 * x)) < 0.99


def test_correlation_constant_input_and_errors():
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    with pytest.raises(ValueError, match="3 values but y has 2"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        pearson([1.0], [2.0])
    with pytest.raises(ValueError, match="NaN"):
        pearson([1.0, float("inf")], [1.0, 2.0])


# ------------------------------------------------------------ relative distance


def test_relative_distance_matches_numpy_float64():
    gen = torch.Generator().manual_seed(0)
    a = {"w1": torch.randn(300, 200, generator=gen) * 1e3, "w2": torch.randn(50, generator=gen), "only_a": torch.ones(3)}
    b = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in a.items() if k != "only_a"}
    b["only_b"] = torch.zeros(2)
    num = sum(np.sum((a[k].double().numpy() - b[k].double().numpy()) ** 2) for k in ("w1", "w2"))
    den = sum(np.sum(a[k].double().numpy() ** 2) for k in ("w1", "w2"))
    assert relative_distance(a, b) == pytest.approx(math.sqrt(num / den), rel=1e-12, abs=0)


def test_relative_distance_errors():
    with pytest.raises(ValueError, match="share no keys"):
        relative_distance({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match=r"x: \(2,\) vs \(3,\); y: \(1, 2\) vs \(2, 1\)"):
        relative_distance(
            {"x": torch.ones(2), "y": torch.ones(1, 2), "z": torch.ones(1)},
            {"x": torch.ones(3), "y": torch.ones(2, 1), "z": torch.ones(1)},
        )
    with pytest.raises(ValueError, match="zero"):
        relative_distance({"x": torch.zeros(2)}, {"x": torch.ones(2)})


# ---------------------------------------------------------------- influence share


def test_influence_share_uses_absolute_per_module_contributions():
    mlp = np.array([[1.0, -3.0], [3.0, -1.0]])  # 2 modules x 2 pairs; signed sums cancel to 0
    attn = torch.tensor([[0.5, -1.5]])
    out = influence_share(mlp, attn, param_count_mlp=75, param_count_attn=25)
    abs_mlp, abs_attn = 1 + 3 + 3 + 1, 0.5 + 1.5
    assert out["abs_influence_mlp"] == abs_mlp and out["abs_influence_attn"] == abs_attn
    assert out["influence_share_mlp"] == pytest.approx(abs_mlp / (abs_mlp + abs_attn))
    assert out["influence_share_attn"] == pytest.approx(abs_attn / (abs_mlp + abs_attn))
    assert out["param_share_attn"] == pytest.approx(0.25)
    assert out["param_share_mlp"] == pytest.approx(0.75)
    assert "param_share_mlp" not in influence_share(mlp, attn)


def test_influence_share_errors():
    with pytest.raises(ValueError, match="zero"):
        influence_share(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="both parameter counts"):
        influence_share(np.ones(3), np.ones(2), param_count_mlp=5)
