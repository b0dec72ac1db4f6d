"""P(V), MS-IF, SS-IF and GDP against explicit dense float64 formulas, for each architecture."""

import pytest
import torch

from msif_assets.engine import (
    Damping, FactorArgs, discover_modules, document_example, fit_factors, precondition,
    preconditioned_queries, query_example, score_examples, sequence_gradients,
)

from .reference import ARCHS, brute_gradients, build_tiny, dense_ekfac_inverse, perturbed_copy, random_sequences

ARGS = FactorArgs(labels="data", batch_size=3)


@pytest.fixture(scope="module", params=ARCHS)
def world(request, tmp_path_factory):
    pt = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    ft = perturbed_copy(pt)
    specs = discover_modules(pt)
    fit_docs = [document_example(ids) for ids in random_sequences(8, seed=11)]
    ft_docs = [query_example(ids[:2], ids[2:]) for ids in random_sequences(8, seed=12, low=4)]
    candidates = [document_example(ids) for ids in random_sequences(5, seed=13)]
    queries = [query_example(ids[:3], ids[3:]) for ids in random_sequences(3, seed=14, low=5)]
    pt_f = fit_factors(pt, specs, fit_docs, ARGS)
    ft_f = fit_factors(ft, specs, ft_docs, ARGS)
    return pt, ft, specs, pt_f, ft_f, candidates, queries


def _dense_inverse(factors, name, damping):
    b = factors.eigenbasis
    lam = factors.lambdas[name]
    return dense_ekfac_inverse(b.q_a[name], b.q_s[name], lam, damping.resolve(lam))


@pytest.mark.parametrize("damping", [Damping("absolute", 1e-3), Damping("relative", 0.1)])
def test_precondition_matches_explicit_inverse(world, damping):
    _, _, specs, pt_f, _, _, _ = world
    gen = torch.Generator().manual_seed(0)
    vectors = {s.name: torch.randn(2, s.d_out, s.d_in, generator=gen, dtype=torch.float64) for s in specs}
    out = precondition(pt_f, vectors, damping)
    for s in specs:
        expected = (_dense_inverse(pt_f, s.name, damping) @ vectors[s.name].reshape(2, -1).T).T
        torch.testing.assert_close(out[s.name].reshape(2, -1), expected, rtol=1e-7, atol=1e-10)


def test_precondition_never_mutates_factors(world):
    _, _, specs, pt_f, _, _, _ = world
    before = {k: v.clone() for k, v in pt_f.lambdas.items()}
    vectors = {s.name: torch.ones(1, s.d_out, s.d_in, dtype=torch.float64) for s in specs}
    first = precondition(pt_f, vectors, Damping("relative", 0.1))
    second = precondition(pt_f, vectors, Damping("relative", 0.1))
    for s in specs:
        assert torch.equal(first[s.name], second[s.name])
        assert torch.equal(before[s.name], pt_f.lambdas[s.name])


def test_query_gradients_mask_the_prompt(world):
    _, ft, specs, _, _, _, queries = world
    grads = sequence_gradients(ft, specs, queries, batch_size=2)
    ref = brute_gradients(ft, specs, queries)
    for s in specs:
        torch.testing.assert_close(grads[s.name], ref[s.name], rtol=1e-7, atol=1e-9)
    # the same tokens with the prompt counted as targets give a different gradient
    full = [document_example(q.input_ids) for q in queries]
    unmasked = brute_gradients(ft, specs, full)
    assert not torch.allclose(unmasked[specs[0].name], ref[specs[0].name])


@pytest.mark.parametrize("method", ["ms-if", "ss-if", "gdp"])
def test_scores_match_dense_formula(world, method):
    pt, ft, specs, pt_f, ft_f, candidates, queries = world
    damping = Damping("absolute", 1e-2)
    g_q = sequence_gradients(ft, specs, queries, batch_size=2)
    vectors = preconditioned_queries(method, g_q, pt_f, ft_f, damping)
    scored_model = ft if method == "ss-if" else pt
    scores = score_examples(scored_model, specs, vectors, candidates, batch_size=2)

    g_q_ref = brute_gradients(ft, specs, queries)
    g_z_ref = brute_gradients(scored_model, specs, candidates)
    expected = torch.zeros(len(candidates), len(queries), dtype=torch.float64)
    for s in specs:
        q = g_q_ref[s.name].reshape(len(queries), -1)
        z = g_z_ref[s.name].reshape(len(candidates), -1)
        eye = torch.eye(q.shape[1], dtype=torch.float64)
        p_ft = _dense_inverse(ft_f, s.name, damping) if method != "gdp" else eye
        p_pt = _dense_inverse(pt_f, s.name, damping) if method == "ms-if" else eye
        expected += z @ (q @ p_ft @ p_pt).T
    torch.testing.assert_close(scores.total, expected, rtol=1e-6, atol=1e-9 * expected.abs().max())


def test_multi_stage_differs_from_single_preconditioner(world):
    """Known pitfall: applying only one of the two preconditioners."""
    pt, ft, specs, pt_f, ft_f, candidates, queries = world
    g_q = sequence_gradients(ft, specs, queries)
    d = Damping("absolute", 1e-2)
    ms = score_examples(pt, specs, preconditioned_queries("ms-if", g_q, pt_f, ft_f, d), candidates).total
    only_ft = score_examples(pt, specs, preconditioned_queries("ss-if", g_q, pt_f, ft_f, d), candidates).total
    assert not torch.allclose(ms, only_ft, rtol=1e-3)


def test_decompositions_sum_to_total(world):
    pt, ft, specs, pt_f, ft_f, candidates, queries = world
    vectors = preconditioned_queries("ms-if", sequence_gradients(ft, specs, queries), pt_f, ft_f, Damping())
    scores = score_examples(pt, specs, vectors, candidates, batch_size=2, per_token=True)
    total = scores.total
    torch.testing.assert_close(scores.group_total("mlp") + scores.group_total("attn"), total)
    torch.testing.assert_close(sum(scores.layer_totals().values()), total)
    torch.testing.assert_close(scores.per_token.sum(-1), total, rtol=1e-9, atol=1e-9 * total.abs().max())
    # padding positions contribute nothing
    padded = [row for row, e in enumerate(candidates) if len(e.input_ids) < scores.per_token.shape[-1]]
    assert padded
    for row in padded:
        assert scores.per_token[row, :, len(candidates[row].input_ids):].abs().sum() == 0


def test_batch_size_and_repeats_change_nothing(world):
    pt, ft, specs, pt_f, ft_f, candidates, queries = world
    vectors = preconditioned_queries("ms-if", sequence_gradients(ft, specs, queries), pt_f, ft_f, Damping())
    a = score_examples(pt, specs, vectors, candidates, batch_size=1).total
    b = score_examples(pt, specs, vectors, candidates, batch_size=4).total
    c = score_examples(pt, specs, vectors, candidates, batch_size=4).total
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * a.abs().max())
    assert torch.equal(b, c)


def test_bfloat16_statistics_agree_with_full_precision(tmp_path):
    """Low-precision products for the d² statistics (the fast path on bf16 hardware) keep
    scores in agreement with full precision; float64 models never lower precision."""
    from scipy import stats

    from msif_assets.engine.influence import product_dtype

    model = build_tiny("gpt_neox", tmp_path, dtype=torch.float32)
    assert product_dtype(build_tiny("gpt_neox", tmp_path / "f64"), "bfloat16") is None
    specs = discover_modules(model)
    fit = [document_example(ids) for ids in random_sequences(24, seed=21, low=6, high=12)]
    candidates = [document_example(ids) for ids in random_sequences(12, seed=22)]
    queries = [query_example(ids[:3], ids[3:]) for ids in random_sequences(4, seed=23, low=5)]
    grads = sequence_gradients(model, specs, queries)
    totals = {}
    for stats_dtype in ("model", "bfloat16"):
        factors = fit_factors(model, specs, fit, FactorArgs(batch_size=8, stats_dtype=stats_dtype))
        assert factors.metadata.stats_dtype == stats_dtype
        vectors = preconditioned_queries("ss-if", grads, None, factors, Damping("relative", 0.1))
        totals[stats_dtype] = score_examples(model, specs, vectors, candidates).total.flatten().numpy()
    assert stats.pearsonr(totals["model"], totals["bfloat16"])[0] > 0.99
    assert not (totals["model"] == totals["bfloat16"]).all()  # the low-precision path really ran
