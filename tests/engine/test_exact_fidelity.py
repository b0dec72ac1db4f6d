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
