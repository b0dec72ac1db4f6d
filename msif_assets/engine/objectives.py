"""What a backward pass differentiates: summed log-likelihoods, never token means.

Every objective returns a scalar ``Σ_sequences Σ_targets log p(y_t)``. Sequences in a batch
do not interact, so the gradient of the sum w.r.t. a module output at (b, t) is exactly that
sequence's own ``s_t``; per-sequence gradients are recovered from ``s`` and ``a`` per row.
"""

from __future__ import annotations

from typing import Literal

import torch

from .batching import LMBatch

LabelSource = Literal["data", "sampled"]


def _target_logits(logits: torch.Tensor, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each target token: logits at t-1 predict token t.

    Returns ``(pred (N, V), tokens (N,))`` over the N target positions of the batch.
    """
    shifted_mask = batch.target_mask[:, 1:]
    pred = logits[:, :-1][shifted_mask]
    tokens = batch.input_ids[:, 1:][shifted_mask]
    return pred, tokens


def sample_from(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One label per row drawn from ``softmax(logits)`` (N, V) → (N,)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def log_likelihood(
    logits: torch.Tensor,
    batch: LMBatch,
    labels: LabelSource = "data",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Summed log-probability of the batch's targets.

    ``logits``: (B, T, V) for causal LMs, or (B, C) for sequence classification (the target
    is ``batch.labels``). With ``labels="sampled"`` the targets are drawn from the model's own
    predictive distribution (true Fisher) instead of the data.
    """
    if logits.dim() == 2:
        if batch.labels is None:
            raise ValueError("classification logits need batch.labels")
        pred, tokens = logits, batch.labels
    else:
        pred, tokens = _target_logits(logits, batch)
    if labels == "sampled":
        tokens = sample_from(pred, generator)
    elif labels != "data":
        raise ValueError(f"labels={labels!r}; choose 'data' or 'sampled'")
    log_probs = torch.log_softmax(pred, dim=-1)
    return log_probs.gather(-1, tokens[:, None]).sum()
