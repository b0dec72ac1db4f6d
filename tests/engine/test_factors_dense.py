"""A, S and Λ against brute-force float64 references, for each architecture."""

import pytest
import torch

from msif_assets.engine import (
    FactorArgs, discover_modules, document_example, eigendecompose, fit_covariance, fit_factors, fit_lambdas,
)

from .reference import ARCHS, brute_covariances, brute_gradients, build_tiny, random_sequences

DATA = FactorArgs(labels="data", batch_size=3)


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    model = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    examples = [document_example(ids) for ids in random_sequences(7, seed=3)]
    return model, discover_modules(model), examples


def test_covariances_match_brute_force(arch_model):
    model, specs, examples = arch_model
    stats = fit_covariance(model, specs, examples, DATA)
    a_ref, s_ref, tokens = brute_covariances(model, specs, examples)
    assert stats.token_count == tokens
    for s in specs:
        torch.testing.assert_close(stats.a_sums[s.name], a_ref[s.name], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(stats.s_sums[s.name], s_ref[s.name], rtol=1e-9, atol=1e-10)
        assert stats.s_sums[s.name].abs().sum() > 0


@pytest.mark.parametrize("split", [True, False])
def test_corrected_eigenvalues_match_brute_force(arch_model, split):
    model, specs, examples = arch_model
    stats = fit_covariance(model, specs, examples, DATA)
    basis = eigendecompose(stats, specs, split_heads=split)
    lam = fit_lambdas(model, specs, basis, examples, DATA)
    grads = brute_gradients(model, specs, examples)
    assert lam.sequence_count == len(examples)
    for s in specs:
        rotated = basis.q_s[s.name].T @ grads[s.name] @ basis.q_a[s.name]
        torch.testing.assert_close(lam.sums[s.name], rotated.square().sum(0), rtol=1e-9, atol=1e-12)


def test_eigenbasis_reconstructs_covariance(arch_model):
    model, specs, examples = arch_model
    stats = fit_covariance(model, specs, examples, DATA)
    a_mean, s_mean = stats.means()
    basis = eigendecompose(stats, specs, split_heads=False)
    for s in specs:
        q, e = basis.q_s[s.name], basis.eig_s[s.name]
        torch.testing.assert_close(q @ torch.diag(e) @ q.T, s_mean[s.name], rtol=1e-8, atol=1e-12)
        q, e = basis.q_a[s.name], basis.eig_a[s.name]
        torch.testing.assert_close(q @ torch.diag(e) @ q.T, a_mean[s.name], rtol=1e-8, atol=1e-12)


def test_split_eigenbasis_is_block_diagonal(arch_model):
    model, specs, examples = arch_model
    basis = eigendecompose(fit_covariance(model, specs, examples, DATA), specs, split_heads=True)
    split = [s for s in specs if s.head_blocks]
    assert split, "every architecture has q/k/v projections"
    for s in split:
        q = basis.q_s[s.name]
        mask = torch.zeros_like(q, dtype=torch.bool)
        for start, stop in s.head_blocks:
            mask[start:stop, start:stop] = True
        assert q[~mask].abs().max() == 0
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), rtol=0, atol=1e-10)


def test_partition_merge_equals_whole(arch_model):
    model, specs, examples = arch_model
    args = FactorArgs(labels="data", batch_size=2)
    whole = fit_covariance(model, specs, examples, args)
    merged = fit_covariance(model, specs, examples[:3], args).merge(fit_covariance(model, specs, examples[3:], args))
    assert merged.token_count == whole.token_count
    basis = eigendecompose(whole, specs)
    lam_whole = fit_lambdas(model, specs, basis, examples, args)
    lam_merged = fit_lambdas(model, specs, basis, examples[:4], args).merge(fit_lambdas(model, specs, basis, examples[4:], args))
    for s in specs:
        torch.testing.assert_close(merged.a_sums[s.name], whole.a_sums[s.name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.s_sums[s.name], whole.s_sums[s.name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lam_merged.sums[s.name], lam_whole.sums[s.name], rtol=1e-12, atol=1e-14)


def test_batch_size_changes_nothing(arch_model):
    model, specs, examples = arch_model
    one = fit_factors(model, specs, examples, FactorArgs(labels="data", batch_size=1))
    many = fit_factors(model, specs, examples, FactorArgs(labels="data", batch_size=5))
    for s in specs:
        torch.testing.assert_close(one.lambdas[s.name], many.lambdas[s.name], rtol=1e-9, atol=1e-12)


def test_sampled_labels_are_seeded_and_differ_from_data(arch_model):
    model, specs, examples = arch_model
    first = fit_covariance(model, specs, examples, FactorArgs(seed=5))
    again = fit_covariance(model, specs, examples, FactorArgs(seed=5))
    other = fit_covariance(model, specs, examples, FactorArgs(seed=6))
    data = fit_covariance(model, specs, examples, DATA)
    name = specs[-1].name
    assert torch.equal(first.s_sums[name], again.s_sums[name])
    assert not torch.allclose(first.s_sums[name], other.s_sums[name])
    assert not torch.allclose(first.s_sums[name], data.s_sums[name])
    torch.testing.assert_close(first.a_sums[name], data.a_sums[name])  # A does not depend on labels


def test_sampled_fisher_estimates_the_ggn_trace(tmp_path):
    """E_y~p[s sᵀ] is the GGN's output block: many sampled draws approach its exact value."""
    model = build_tiny("gpt_neox", tmp_path)
    specs = discover_modules(model)[-1:]
    example = [document_example([3, 4, 5, 6])]
    draws = [fit_covariance(model, specs, example, FactorArgs(seed=k)).s_sums[specs[0].name] for k in range(400)]
    estimate = torch.stack(draws).mean(0)
    # exact: Σ_t J_tᵀ (diag p − p pᵀ) J_t with J_t = ∂logits_t/∂y_t through the head (linear + final norm)
    logits_of_output = {}
    module = dict(model.named_modules())[specs[0].name]
    module.register_forward_hook(lambda m, i, o: logits_of_output.setdefault("y", o))
    out = model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits[0]
    y = logits_of_output["y"]
    exact = 0
    for t in range(3):
        p = torch.softmax(out[t], -1).detach()
        h = torch.diag(p) - torch.outer(p, p)
        jac = torch.stack([torch.autograd.grad(out[t, v], y, retain_graph=True)[0][0].reshape(-1) for v in range(out.shape[-1])])
        exact = exact + jac.T @ h @ jac
    exact = exact.reshape(4, -1, 4, y.shape[-1]).diagonal(dim1=0, dim2=2).sum(-1)
    rel = (estimate - exact).norm() / exact.norm()
    assert rel < 0.15, rel
