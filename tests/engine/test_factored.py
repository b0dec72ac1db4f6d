"""Query gradients in token form and their low-rank preconditioning (float64, every architecture):
the token form is the exact gradient, GDP's truncation is the exact best rank-r approximation,
SS-IF's randomized truncation is within a hair of the best one, MS-IF with a full inner rank
likewise, and modules where factors would not be smaller get the dense path's exact vectors."""

import pytest
import torch

from msif_assets.engine import (
    Damping, discover_modules, document_example, fit_factors, preconditioned_queries, query_example, sequence_gradients,
    token_gradients,
)
from msif_assets.engine.factored import Factored, exact_truncation, is_low_rank_worth_it, low_rank_vectors, top_singular
from msif_assets.engine.lowrank import LowRankQueries, truncate

from .reference import ARCHS, build_tiny, perturbed_copy, random_sequences


@pytest.fixture(scope="module", params=ARCHS)
def world(request, tmp_path_factory):
    pt = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    ft = perturbed_copy(pt)
    specs = discover_modules(pt)
    docs = [document_example(ids) for ids in random_sequences(12, seed=3)]
    pt_f, ft_f = fit_factors(pt, specs, docs), fit_factors(ft, specs, docs)
    queries = [query_example(ids[:3], ids[3:]) for ids in random_sequences(5, seed=4, low=5)]
    return ft, specs, queries, pt_f, ft_f


def _dense(v):
    return v.dense() if isinstance(v, LowRankQueries) else v


def test_token_form_is_the_exact_per_query_gradient(world):
    ft, specs, queries, _, _ = world
    dense = sequence_gradients(ft, specs, queries, batch_size=2)
    tokens = token_gradients(ft, specs, queries, batch_size=3)
    for spec in specs:
        torch.testing.assert_close(tokens[spec.name].dense(), dense[spec.name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["gdp", "ss-if", "ms-if"])
@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_vectors_are_near_the_best_rank_r_approximation(world, method, rank):
    ft, specs, queries, pt_f, ft_f = world
    damping = Damping("relative", 0.1)
    exact = preconditioned_queries(method, sequence_gradients(ft, specs, queries), pt_f, ft_f, damping)
    tokens = token_gradients(ft, specs, queries)
    low_rank_modules = 0
    for spec in specs:
        got = low_rank_vectors(method, tokens[spec.name], spec.name, rank, 10_000, pt_f, ft_f, damping)
        best = _dense(truncate(exact[spec.name], rank))
        if not is_low_rank_worth_it(rank, spec.d_out, spec.d_in):
            assert not isinstance(got, LowRankQueries)
            torch.testing.assert_close(got, exact[spec.name], rtol=1e-10, atol=1e-12)
            continue
        low_rank_modules += 1
        assert isinstance(got, LowRankQueries) and got.rank == rank
        optimal = (exact[spec.name] - best).flatten(1).norm(dim=1)
        error = (exact[spec.name] - got.dense()).flatten(1).norm(dim=1)
        scale = exact[spec.name].flatten(1).norm(dim=1)
        if method == "gdp":  # the factors' own SVD: exact
            torch.testing.assert_close(got.dense(), best, rtol=1e-9, atol=1e-11 * float(scale.max()))
        else:  # randomized range finder: at most 2 % more error than the optimum
            assert bool((error <= 1.02 * optimal + 1e-12 * scale).all()), (spec.name, error / optimal)
    assert low_rank_modules > 0


@pytest.mark.parametrize("method", ["ss-if", "ms-if"])
def test_float32_query_gradients_take_the_float32_svd_and_stay_near_the_best_rank_r(world, method):
    """Float32 gradients run the SVD and rotation back in float32 (the rotation in and the
    division stay float64): the vectors come back float32 and are within 2 % + float32
    rounding of the optimal truncation error, as the float64 path is."""
    ft, specs, queries, pt_f, ft_f = world
    damping, rank = Damping("relative", 0.1), 3
    exact = preconditioned_queries(method, sequence_gradients(ft, specs, queries), pt_f, ft_f, damping)
    tokens = token_gradients(ft, specs, queries)
    checked = 0
    for spec in specs:
        if not is_low_rank_worth_it(rank, spec.d_out, spec.d_in):
            continue
        t = tokens[spec.name]
        got = low_rank_vectors(method, type(t)(t.a.float(), t.s.float()), spec.name, rank, 10_000, pt_f, ft_f, damping)
        assert got.left.dtype == torch.float32
        optimal = (exact[spec.name] - _dense(truncate(exact[spec.name], rank))).flatten(1).norm(dim=1)
        error = (exact[spec.name] - got.dense().double()).flatten(1).norm(dim=1)
        scale = exact[spec.name].flatten(1).norm(dim=1)
        assert bool((error <= 1.02 * optimal + 1e-5 * scale).all()), (spec.name, error / optimal)
        checked += 1
    assert checked > 0


def test_a_small_inner_rank_is_an_approximation_and_a_full_one_is_not(world):
    ft, specs, queries, pt_f, ft_f = world
    damping = Damping("relative", 0.1)
    exact = preconditioned_queries("ms-if", sequence_gradients(ft, specs, queries), pt_f, ft_f, damping)
    tokens = token_gradients(ft, specs, queries)
    spec = max((s for s in specs if is_low_rank_worth_it(2, s.d_out, s.d_in)), key=lambda s: min(s.d_out, s.d_in))
    errors = {}
    for inner in (2, 10_000):
        got = low_rank_vectors("ms-if", tokens[spec.name], spec.name, 2, inner, pt_f, ft_f, damping)
        errors[inner] = float((exact[spec.name] - got.dense()).norm())
    optimal = float((exact[spec.name] - truncate(exact[spec.name], 2).dense()).norm())
    assert errors[10_000] <= 1.02 * optimal
    assert errors[2] >= errors[10_000]


def test_randomized_truncation_is_deterministic_and_matches_the_svd_on_a_decaying_spectrum():
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(3, 60, 40, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(3, 50, 40, generator=generator, dtype=torch.float64)).Q
    sigma = 0.5 ** torch.arange(40, dtype=torch.float64)
    matrices = (u * sigma) @ v.mT  # (3, 60, 50)
    first, second = top_singular(matrices, 5), top_singular(matrices, 5)
    assert torch.equal(first.left, second.left) and torch.equal(first.right, second.right)
    torch.testing.assert_close(first.dense(), _dense(truncate(matrices, 5)), rtol=1e-10, atol=1e-12)


def test_exact_truncation_pads_when_the_factors_have_fewer_columns_than_the_rank():
    generator = torch.Generator().manual_seed(1)
    x = Factored(torch.randn(2, 30, 2, generator=generator, dtype=torch.float64),
                 torch.randn(2, 20, 2, generator=generator, dtype=torch.float64))
    out = exact_truncation(x, 4)
    assert out.left.shape == (2, 30, 4) and out.right.shape == (2, 20, 4)
    torch.testing.assert_close(out.dense(), x.dense(), rtol=1e-12, atol=1e-12)


def test_the_fine_tuned_stage_is_shared_by_ss_if_and_ms_if_without_changing_either(world):
    ft, specs, queries, pt_f, ft_f = world
    damping, rank = Damping("relative", 0.1), 2
    tokens = token_gradients(ft, specs, queries)
    spec = next(s for s in specs if is_low_rank_worth_it(rank, s.d_out, s.d_in))
    alone = {m: low_rank_vectors(m, tokens[spec.name], spec.name, rank, rank, pt_f, ft_f, damping) for m in ("ss-if", "ms-if")}
    stages: dict = {}
    shared = {m: low_rank_vectors(m, tokens[spec.name], spec.name, rank, rank, pt_f, ft_f, damping, stages) for m in ("ss-if", "ms-if")}
    assert list(stages) == [(damping, rank)]  # computed once, reused by MS-IF
    for method in alone:
        torch.testing.assert_close(shared[method].dense(), alone[method].dense(), rtol=0, atol=0)
    low_rank_vectors("ms-if", tokens[spec.name], spec.name, rank, 2 * rank, pt_f, ft_f, damping, stages)
    assert len(stages) == 2  # another inner rank is another stage, never a wrong reuse
