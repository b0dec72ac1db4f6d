"""The exact GGN reference (EK-FAC fidelity against it: tests/pipeline/test_fidelity_eval.py)."""

import torch

from msif_assets.engine import discover_modules, document_example
from msif_assets.engine.exact import exact_ggn

from .reference import build_tiny, log_prob_of_targets, _matrix_grad


def test_exact_ggn_equals_expected_outer_product_of_label_gradients(tmp_path):
    """G = Σ_t Σ_y p(y) g_y g_yᵀ, each g_y from its own backward pass."""
    model = build_tiny("gpt_neox", tmp_path)
    specs = discover_modules(model, "mlp")[:1]
    example = document_example([4, 7, 9])
    module = dict(model.named_modules())[specs[0].name]
    expected = 0
    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].detach()
    for t in (1, 2):
        probs = torch.softmax(logits[t - 1], -1)
        for y in range(logits.shape[-1]):
            ids = list(example.input_ids[:t]) + [y]
            model.zero_grad()
            log_prob_of_targets(model, ids, [False] * t + [True]).backward()
            g = _matrix_grad(module, specs[0].transposed, specs[0].has_bias).reshape(-1)
            expected = expected + probs[y] * torch.outer(g, g)
    torch.testing.assert_close(exact_ggn(model, specs, [example]), expected, rtol=1e-8, atol=1e-12)


def _brute_ggn(model, specs, examples) -> torch.Tensor:
    """mean over examples of Σ_t Σ_y p(y) g_y g_yᵀ, g_y the gradient over every module in
    ``specs`` (flattened and concatenated), each from its own backward pass."""
    modules = dict(model.named_modules())
    total = 0
    for example in examples:
        ids = list(example.input_ids)
        logits = model(input_ids=torch.tensor([ids])).logits[0].detach()
        for t in range(1, len(ids)):
            if not example.target_mask[t]:
                continue
            probs = torch.softmax(logits[t - 1], -1)
            for y in range(logits.shape[-1]):
                model.zero_grad()
                log_prob_of_targets(model, ids[:t] + [y], [False] * t + [True]).backward()
                g = torch.cat([_matrix_grad(modules[s.name], s.transposed, s.has_bias).reshape(-1) for s in specs])
                total = total + probs[y] * torch.outer(g, g)
    model.zero_grad()
    return total / len(examples)


def test_exact_ggn_couples_modules_and_averages_examples(tmp_path):
    """An attention and an MLP module (cross-module blocks) over two examples of different
    lengths, the Gram accumulated in 3 column blocks (upper triangle, then mirrored)."""
    model = build_tiny("gpt_neox", tmp_path)
    specs = [discover_modules(model, "attn")[0], discover_modules(model, "mlp")[-1]]
    examples = [document_example([4, 7, 9]), document_example([5, 3, 8, 11])]
    expected = _brute_ggn(model, specs, examples)
    flags = [p.requires_grad for p in model.parameters()]
    for blocks in (1, 3):
        got = exact_ggn(model, specs, examples, blocks=blocks)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)
        assert torch.equal(got, got.T)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
