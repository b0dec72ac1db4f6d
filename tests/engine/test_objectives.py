"""The traversal backpropagates a closed-form logit gradient; it must equal autograd's gradient
of the summed log-likelihood exactly, for data and sampled labels, LM and classification."""

from __future__ import annotations

import pytest
import torch

from msif_assets.engine.batching import classification_example, collate, document_example, query_example
from msif_assets.engine.objectives import log_likelihood, logit_gradient, sample_from, sample_from_probs

from .reference import ARCHS, build_tiny, random_sequences


def _autograd(logits: torch.Tensor, batch, labels: str, seed: int) -> torch.Tensor:
    leaf = logits.detach().requires_grad_(True)
    log_likelihood(leaf, batch, labels, torch.Generator().manual_seed(seed)).backward()
    return leaf.grad


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("labels", ["data", "sampled"])
def test_logit_gradient_equals_autograd(arch, labels, tmp_path):
    model = build_tiny(arch, tmp_path)
    seqs = random_sequences(4, seed=3)
    examples = [document_example(seqs[0]), query_example(seqs[1][:3], seqs[1][3:]), document_example(seqs[2]),
                query_example(seqs[3][:2], seqs[3][2:])]
    batch = collate(examples, range(len(examples)), pad_id=0)  # right-padded, prompts masked
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    closed = logit_gradient(logits, batch, labels, torch.Generator().manual_seed(7))
    torch.testing.assert_close(closed, _autograd(logits, batch, labels, 7), rtol=1e-12, atol=1e-14)
    # rows that predict no target (prompt, last position, pads) carry no gradient
    rows = torch.zeros_like(batch.target_mask)
    rows[:, :-1] = batch.target_mask[:, 1:]
    assert closed[~rows].abs().max() == 0
    assert torch.allclose(closed[rows].sum(-1), torch.zeros(int(rows.sum()), dtype=closed.dtype), atol=1e-12)


def test_classification_logit_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    batch = collate([classification_example([3, 4, 5], label) for label in (0, 2, 1, 1, 0)], range(5), pad_id=0)
    for labels in ("data", "sampled"):
        closed = logit_gradient(logits, batch, labels, torch.Generator().manual_seed(1))
        torch.testing.assert_close(closed, _autograd(logits, batch, labels, 1), rtol=1e-12, atol=1e-14)


def test_inverse_cdf_sampler_matches_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float32)
    draws = sample_from_probs(probs.repeat(50_000, 1), torch.Generator().manual_seed(0)).view(50_000, 2)
    freq = torch.stack([torch.bincount(draws[:, r], minlength=5) for r in range(2)]).double() / 50_000
    assert freq[:, [1, 4]].sum() == 0 and freq[1, 3] == 1  # zero-probability tokens are never drawn
    torch.testing.assert_close(freq[0], probs[0].double(), atol=0.01, rtol=0)
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    same = [sample_from(logits, torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(*same)  # seeded
