"""Low-rank query vectors: the truncation is the best rank-r approximation, and scoring against
the factors equals scoring against the dense matrix they stand for (float64, every architecture)."""

import pytest
import torch

from msif_assets.engine import discover_modules, document_example, query_example, score_examples, sequence_gradients
from msif_assets.engine.lowrank import LowRankQueries, stack, truncate

from .reference import ARCHS, build_tiny, random_sequences


@pytest.fixture(scope="module", params=ARCHS)
def world(request, tmp_path_factory):
    model = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    specs = discover_modules(model)
    candidates = [document_example(ids) for ids in random_sequences(5, seed=13)]
    queries = [query_example(ids[:3], ids[3:]) for ids in random_sequences(4, seed=14, low=5)]
    return model, specs, candidates, sequence_gradients(model, specs, queries, batch_size=2)


def _factored(vectors: dict, rank: int) -> dict:
    return {name: truncate(v, rank) for name, v in vectors.items()}


def test_full_rank_factors_score_exactly_like_the_dense_vectors(world):
    model, specs, candidates, grads = world
    dense = score_examples(model, specs, grads, candidates, batch_size=2)
    factors = {}
    for name, v in grads.items():  # every singular vector kept, in factored form
        u, sigma, vh = torch.linalg.svd(v, full_matrices=False)
        factors[name] = LowRankQueries(u * sigma[:, None, :], vh.transpose(1, 2))
    factored = score_examples(model, specs, factors, candidates, batch_size=2, per_token=True)
    torch.testing.assert_close(factored.per_module, dense.per_module, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(factored.per_token.sum(-1), factored.total, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["tokens", "dense"])
@pytest.mark.parametrize("rank", [1, 2])
def test_rank_r_scores_equal_the_dense_product_of_the_stored_factors(world, rank, path, monkeypatch):
    from msif_assets.engine import lowrank

    monkeypatch.setattr(lowrank, "token_path_is_cheaper", lambda *args: path == "tokens")
    model, specs, candidates, grads = world
    factors = _factored(grads, rank)
    assert any(isinstance(f, LowRankQueries) for f in factors.values())
    got = score_examples(model, specs, factors, candidates, batch_size=3)
    dense = {name: f.dense() if isinstance(f, LowRankQueries) else f for name, f in factors.items()}
    torch.testing.assert_close(got.per_module, score_examples(model, specs, dense, candidates, batch_size=3).per_module,
                               rtol=1e-9, atol=1e-11)


def test_truncation_is_the_best_rank_r_approximation():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, 40, 30, generator=gen, dtype=torch.float64)
    sigma = torch.linalg.svdvals(v)
    for rank in (1, 2, 4, 17):
        error = torch.linalg.matrix_norm(v - truncate(v, rank).dense())
        torch.testing.assert_close(error, sigma[:, rank:].square().sum(-1).sqrt())
    # 0 = off, and from r(m + n) >= m·n (r = 18 here) the factors would not be smaller: the dense matrix
    assert truncate(v, 0) is v and truncate(v, 18) is v and truncate(v, 30) is v


def test_stacking_keeps_the_factored_form_when_ranks_agree():
    gen = torch.Generator().manual_seed(1)
    a, b = (truncate(torch.randn(2, 6, 4, generator=gen), 2) for _ in range(2))
    both = stack([a, b])
    assert isinstance(both, LowRankQueries) and both.n_queries == 4
    torch.testing.assert_close(both.dense(), torch.cat([a.dense(), b.dense()]))
    mixed = stack([a, torch.randn(1, 6, 4, generator=gen)])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (3, 6, 4)
