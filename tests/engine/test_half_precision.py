"""EK-FAC scores from a bfloat16 checkpoint run in float32 equal those from the same weights
saved in float32: the upcast at load is exact, statistics are summed in float64 and
eigendecomposed in float64 whatever the checkpoint's storage dtype."""

import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM

from msif_assets.demo.tokenizer import build_tokenizer
from msif_assets.engine import (
    Damping, FactorArgs, discover_modules, document_example, fit_covariance, fit_factors, preconditioned_queries,
    query_example, score_examples, sequence_gradients,
)
from msif_assets.lake.models import load_causal_lm

from .reference import tiny_config

TEXTS = ["Ada was born in Paris .", "Bob likes the sea .", "Cyd met Dee in Oslo .", "Eve was born in Lima ."]
ARGS = FactorArgs(labels="sampled", seed=3, batch_size=3)
DAMPING = Damping("relative", 0.1)


def _sequences(n: int, vocab: int, seed: int, low: int = 4, high: int = 10) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=gen)
    return [torch.randint(4, vocab, (int(t),), generator=gen).tolist() for t in lengths]


def _save(model, tokenizer, path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _scores(pt, ft, vocab: int) -> dict[str, torch.Tensor]:
    """Every method's (candidates, queries) score matrix, plus the factors' dtypes checked."""
    specs = discover_modules(pt)
    pt_f = fit_factors(pt, specs, [document_example(s) for s in _sequences(9, vocab, 11)], ARGS)
    ft_f = fit_factors(ft, specs, [query_example(s[:2], s[2:]) for s in _sequences(6, vocab, 12)], ARGS)
    for f in (pt_f, ft_f):
        b = f.eigenbasis
        for table in (b.q_a, b.eig_a, b.q_s, b.eig_s, f.lambdas):
            assert {t.dtype for t in table.values()} == {torch.float64}
    g_q = sequence_gradients(ft, specs, [query_example(s[:3], s[3:]) for s in _sequences(3, vocab, 14, low=6)], 2)
    candidates = [document_example(s) for s in _sequences(7, vocab, 13)]
    out = {}
    for method in ("ms-if", "ss-if", "gdp"):
        vectors = preconditioned_queries(method, g_q, pt_f, ft_f, DAMPING)
        out[method] = score_examples(ft if method == "ss-if" else pt, specs, vectors, candidates, batch_size=3).total
    return out


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def models(request, tmp_path_factory):
    """Directories of one pt/ft pair saved in bfloat16, and the same weights upcast and saved in float32."""
    root = tmp_path_factory.mktemp(request.param)
    tokenizer = build_tokenizer(TEXTS, model_max_length=32)
    config = tiny_config(request.param)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    pt = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in pt.parameters():
            p.normal_(0, 0.3)
    ft = type(pt)(config)
    ft.load_state_dict(pt.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    dirs = {}
    for stage, model in (("pt", pt), ("ft", ft)):
        _save(model.to(torch.bfloat16), tokenizer, root / f"{stage}-bf16")
        upcast = load_causal_lm(root / f"{stage}-bf16", dtype=torch.float32, device="cpu").model
        _save(upcast, tokenizer, root / f"{stage}-f32")
        dirs[stage] = (root / f"{stage}-bf16", root / f"{stage}-f32")
    return request.param, len(tokenizer), dirs


def test_bf16_checkpoint_scores_equal_float32_upcast(models):
    arch, vocab, dirs = models

    def load(stage: str, which: int):
        return load_causal_lm(dirs[stage][which], dtype=torch.float32, device="cpu").model

    half = _scores(load("pt", 0), load("ft", 0), vocab)
    upcast = _scores(load("pt", 1), load("ft", 1), vocab)
    for method in half:
        a, b = half[method].flatten().numpy(), upcast[method].flatten().numpy()
        pearson, spearman = stats.pearsonr(a, b)[0], stats.spearmanr(a, b)[0]
        print(f"{arch} {method}: pearson={pearson!r} spearman={spearman!r} max|Δ|={abs(a - b).max()!r}")
        assert bool(torch.isfinite(half[method]).all())
        assert spearman >= 0.99 and pearson >= 0.99
        # same float32 weights, same deterministic passes: identical, not merely correlated
        assert torch.equal(half[method], upcast[method]), method


def test_bf16_checkpoint_statistics_sum_in_float64(models):
    _, vocab, dirs = models
    model = load_causal_lm(dirs["pt"][0], dtype=torch.float32, device="cpu").model
    specs = discover_modules(model)
    for stats_dtype in ("model", "bfloat16"):
        cov = fit_covariance(model, specs, [document_example(s) for s in _sequences(5, vocab, 11)],
                             FactorArgs(batch_size=2, stats_dtype=stats_dtype))
        assert {t.dtype for t in (*cov.a_sums.values(), *cov.s_sums.values())} == {torch.float64}
        assert all(bool(torch.isfinite(t).all()) for t in cov.a_sums.values())
