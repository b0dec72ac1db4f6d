"""THE FLOOR: plain training-style forward + backward (``loss.backward()`` with parameter
``.grad``), summed token loss, same batches as the engine.

This is what any gradient-based attribution must pay at least once per example; every phase's
time is reported as a multiple of it.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from msif_assets.engine import LMExample, make_batches


def forward_backward(model: nn.Module, examples: Sequence[LMExample], batch_size: int, pad_id: int = 0) -> int:
    """One forward + backward per batch with every parameter requiring grad; returns tokens seen.

    The loss is Hugging Face's own shifted cross-entropy (``ignore_index`` on non-targets), summed.
    """
    device = next(model.parameters()).device
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    tokens = 0
    try:
        for batch in make_batches(examples, batch_size, pad_id):
            batch = batch.to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            labels = batch.input_ids[:, 1:].masked_fill(~batch.target_mask[:, 1:], -100)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()
            tokens += int(batch.attention_mask.sum())
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
    return tokens
