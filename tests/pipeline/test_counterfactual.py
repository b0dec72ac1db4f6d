"""The counterfactual evaluation's functions on hand-built data: the runs and their partition keys,
top-k removal sets, LDS subsets, the statistics (Δ log p, flips, LDS, bootstrap intervals) and
the recipe hook with its content-addressed cache (a fake recipe: no training here; real
retraining: tests/defs/test_counterfactual.py)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from msif_assets.engine import Damping
from msif_assets.lake.layout import LakeLayout, validate_key
from msif_assets.pipeline import counterfactual as cf
from msif_assets.pipeline import counterfactual_stats as st
from msif_assets.pipeline import retrain as rt
from msif_assets.pipeline.settings import ComputeSettings

REL = Damping("relative", 0.1)
CALLS: list[int] = []


def fake_recipe(corpus_docs, out_dir, seed, tag="x"):
    """Writes a 'model' naming its documents; counts calls."""
    CALLS.append(seed)
    model = Path(out_dir) / "ft"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"docs": [d["doc_id"] for d in corpus_docs], "seed": seed, "tag": tag}))
    return model


def outside_recipe(corpus_docs, out_dir, seed):
    return Path(out_dir).parent


def two_args(corpus_docs, out_dir):
    return out_dir


# ------------------------------------------------------------------ arguments and runs


def test_args_validate_every_field_and_carry_help():
    with pytest.raises(cf.CounterfactualConfigError, match="ks"):
        cf.CounterfactualArgs(ks=(0, 3))
    with pytest.raises(cf.CounterfactualConfigError, match="alpha"):
        cf.CounterfactualArgs(alpha=1.0)
    with pytest.raises(cf.CounterfactualConfigError, match="recipe"):
        cf.CounterfactualArgs(recipe="no_colon")
    with pytest.raises(cf.CounterfactualConfigError, match=r"\[counterfactual\]: unknown key"):
        cf.CounterfactualArgs.from_config({"k": [1]})
    args = cf.CounterfactualArgs.from_config({"ks": [1, 5], "recipe_options": {"a": 1}})
    assert cf.CounterfactualArgs.from_config(args.to_config()) == args
    assert set(cf.CounterfactualArgs.help()) == set(args.to_config()) and all(cf.CounterfactualArgs.help().values())


def test_runs_have_unique_safe_partition_keys():
    settings = ComputeSettings(dampings=(REL, Damping("absolute", 1e-4)))
    args = cf.CounterfactualArgs(ks=(1, 10), n_subsets=12, noise_seeds=2, noise_subsets=3)
    removal, lds = cf.removal_runs(args, settings.score_keys), cf.lds_runs(args)
    keys = [r.key for r in removal + lds]
    assert len(keys) == len(set(keys)) and all(validate_key(k) for k in keys)
    # 7 score groups + random, 2 ks, + none, 2 reseeds, gold
    assert len(removal) == 8 * 2 + 1 + 2 + 1
    assert {r.key for r in removal if r.kind != "removal"} == {"none", "none-s1", "none-s2"}
    assert "ms-if-abs-0.0001-k10" in keys and "random-k1" in keys
    assert len(lds) == 12 + 2 * 3 and {r.key for r in lds if r.kind == "lds_reseed"} >= {"s00-seed1", "s02-seed2"}


# ------------------------------------------------------------------ removal sets and subsets


def test_top_k_breaks_ties_by_doc_id_and_removals_are_per_query():
    scores = {("gdp", None): {"q1": {"a": 1.0, "b": 3.0, "c": 3.0, "d": -1.0}, "q2": {"a": 5.0, "d": 4.0}}}
    runs = [cf.Run("gdp-k2", "removal", 0, "gdp", None, 2), cf.Run("gold", "removal", 0, "gold"), cf.Run("none", "baseline", 0, "none")]
    rows = cf.removal_rows(runs, scores, {"q1": ["d"], "q2": []}, ["q1", "q2"])
    picked = [(r["run_key"], r["query_id"], r["doc_id"], r["rank"]) for r in rows]
    assert picked == [("gdp-k2", "q1", "b", 1), ("gdp-k2", "q1", "c", 2), ("gdp-k2", "q2", "a", 1), ("gdp-k2", "q2", "d", 2),
                      ("gold", "q1", "d", None)]
    removals = pa.Table.from_pylist(rows)
    assert cf.training_docs(runs[0], ["a", "b", "c", "d", "e"], removals, None) == ["e"]
    assert cf.training_docs(runs[2], ["a", "b"], removals, None) == ["a", "b"]
    with pytest.raises(ValueError, match="no ms-if@rel:0.1 scores"):
        cf.removal_rows([cf.Run("x", "removal", 0, "ms-if", REL, 1)], scores, {}, ["q1"])


def test_document_scores_sum_chunks():
    table = pa.table({"query_id": ["q"] * 3, "doc_id": ["a", "a", "b"], "method": ["ms-if"] * 3,
                      "damping_kind": ["relative"] * 3, "damping": [0.1] * 3, "score": [1.0, 2.0, -1.0]})
    assert cf.document_scores(table) == {("ms-if", REL): {"q": {"a": 3.0, "b": -1.0}}}


def test_lds_subsets_are_seeded_alpha_fractions():
    args = cf.CounterfactualArgs(n_subsets=5, alpha=0.3, subset_seed=4)
    docs = [f"d{i:03d}" for i in range(50)]
    rows = cf.lds_subset_rows(list(reversed(docs)), args)
    by_subset: dict[str, set] = {}
    for r in rows:
        by_subset.setdefault(r["subset"], set()).add(r["doc_id"])
    assert sorted(by_subset) == ["s00", "s01", "s02", "s03", "s04"] and all(len(v) == 15 for v in by_subset.values())
    assert len({frozenset(v) for v in by_subset.values()}) == 5
    assert rows == cf.lds_subset_rows(docs, args)  # order of the corpus does not matter
    assert cf.random_scores(["q"], docs, 1) == cf.random_scores(["q"], list(reversed(docs)), 1) != cf.random_scores(["q"], docs, 2)


# ------------------------------------------------------------------ statistics


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    values = list(np.random.default_rng(0).normal(2.0, 1.0, 50))
    lo, hi = st.bootstrap_ci(values, 1000, 0.95, seed=3)
    assert lo < np.mean(values) < hi and hi - lo < 1.0
    assert (lo, hi) == st.bootstrap_ci(values, 1000, 0.95, seed=3)
    assert st.bootstrap_ci([1.0], 1000, 0.95) == (None, None)


def test_removal_summary_measures_against_the_none_run():
    runs = [cf.Run("none", "baseline", 0, "none"), cf.Run("gdp-k1", "removal", 0, "gdp", None, 1)]
    out = {"none": {"q1": {"logp": -1.0, "greedy": " a", "correct": True}, "q2": {"logp": -2.0, "greedy": " b", "correct": True}},
           "gdp-k1": {"q1": {"logp": -3.0, "greedy": " c", "correct": False}, "q2": {"logp": -2.0, "greedy": " b", "correct": True}}}
    rows = {r["run_key"]: r for r in st.removal_summary(out, runs, {"gdp-k1": 2}, {"gdp-k1": 5.0}, 200, 0.95)}
    assert rows["none"]["mean_delta_logp"] == 0.0 and rows["none"]["flip_rate"] == 0.0
    r = rows["gdp-k1"]
    assert (r["mean_delta_logp"], r["flip_rate"], r["accuracy"], r["n_removed"], r["frac_logp_down"]) == (-1.0, 0.5, 0.5, 2, 0.5)
    with pytest.raises(ValueError, match="'none' retrain"):
        st.removal_summary({"gdp-k1": out["gdp-k1"]}, runs[1:], {}, {}, 10, 0.95)


def test_lds_of_a_linear_datamodel_is_high_and_of_random_scores_is_null():
    rng = np.random.default_rng(1)
    n_docs, n_queries, n_subsets = 60, 30, 40
    docs, qids = [f"d{i}" for i in range(n_docs)], [f"q{j}" for j in range(n_queries)]
    true = rng.normal(size=(n_docs, n_queries))
    members = (rng.random((n_subsets, n_docs)) < 0.5).astype(float)
    measured = members @ true + 0.1 * rng.normal(size=(n_subsets, n_queries))
    good = {q: {d: true[i, j] for i, d in enumerate(docs)} for j, q in enumerate(qids)}
    noise = {q: {d: rng.normal() for d in docs} for q in qids}
    summary, per_query = st.lds_rows(measured, members, {("gdp", None): good, ("random", None): noise}, qids, docs, 1000, 0.95)
    by_method = {r["method"]: r for r in summary}
    assert by_method["gdp"]["lds"] > 0.95 and by_method["gdp"]["n_queries"] == n_queries
    assert by_method["random"]["ci_lo"] <= 0.0 <= by_method["random"]["ci_hi"]
    assert by_method["gdp"]["ci_lo_subsets"] > 0.9 and by_method["random"]["ci_lo_subsets"] <= 0.0 <= by_method["random"]["ci_hi_subsets"]
    assert len(per_query) == 2 * n_queries
    assert st.per_query_spearman(np.ones((5, 1)), np.arange(5.0)[:, None]) == [None]  # constant outputs: no ρ


def test_vectorized_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    a[:3, 1] = 1.0  # ties
    ours = st.per_query_spearman(a, b)
    assert ours == pytest.approx([spearmanr(a[:, j], b[:, j]).statistic for j in range(4)])


def test_reseed_rows_compare_two_seeds_on_the_same_subsets():
    a = np.arange(12.0).reshape(6, 2)
    summary, per_query = st.reseed_rows({1: (a, a + 0.01)}, ["q1", "q2"], 100, 0.95)
    assert summary[0]["lds"] == pytest.approx(1.0) and summary[0]["seed"] == 1 and len(per_query) == 2


# ------------------------------------------------------------------ recipe and cache


def test_recipe_hook_errors_are_clear(tmp_path):
    with pytest.raises(rt.RecipeError, match="cannot import"):
        rt.Recipe.load("no_such_module_abc:f", {})
    with pytest.raises(rt.RecipeError, match="has no function"):
        rt.Recipe.load(f"{__name__}:missing", {})
    with pytest.raises(rt.RecipeError, match=r"\(corpus_docs, out_dir, seed"):
        rt.Recipe.load(f"{__name__}:two_args", {})
    recipe = rt.Recipe.load(f"{__name__}:outside_recipe", {})
    (tmp_path / "out").mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(rt.RecipeError, match="outside its out_dir"):
        recipe.train([], tmp_path / "out", 0)


def test_retrains_are_cached_by_content(tmp_path):
    layout = LakeLayout(tmp_path / "lake")
    recipe = rt.Recipe.load(f"{__name__}:fake_recipe", {"tag": "t"})
    assert recipe.identity != rt.Recipe.load(f"{__name__}:fake_recipe", {"tag": "u"}).identity
    docs = [{"doc_id": "a", "text": "x"}, {"doc_id": "b", "text": "y"}]
    CALLS.clear()
    first = rt.train_or_reuse(layout, recipe, docs, 0, {"partition": "p"})
    again = rt.train_or_reuse(layout, recipe, docs, 0, {"partition": "q"})
    assert CALLS == [0] and not first["reused"] and again["reused"] and first["key"] == again["key"]
    assert json.loads((Path(again["model_dir"]) / "config.json").read_text())["docs"] == ["a", "b"]
    other_text = rt.train_or_reuse(layout, recipe, [docs[0], {"doc_id": "b", "text": "z"}], 0, {})
    other_seed = rt.train_or_reuse(layout, recipe, docs, 1, {})
    assert CALLS == [0, 0, 1] and len({first["key"], other_text["key"], other_seed["key"]}) == 3
