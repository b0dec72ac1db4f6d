"""Greedy decoding for Hugging Face causal LMs: plain argmax, no sampling and no logits processors.

Prompts of a batch are left-padded, and positions are counted from each prompt's first real
token, so a padded prompt sees exactly the positions (and therefore the tokens) it would see
alone. Every step re-runs the whole sequence (no KV cache): prompts and answers here are short.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["greedy_completion", "greedy_token_ids"]


@torch.no_grad()
def greedy_token_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None = None,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (token ids), cut before its first end token.

    ``eos_token_id``: the end token, or several (a row stops at whichever comes first); with
    None every continuation is ``max_new_tokens`` long. ``pad_token_id`` only fills the
    (masked) left padding; it defaults to the first end token, else 0. The model is run as
    it is (call ``model.eval()`` first), on its own device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy decoding needs a non-empty prompt")
    device = next(model.parameters()).device
    ends = _token_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else ends[0] if ends else 0
    fill = ends[0] if ends else pad  # what a finished row appends (rows finish only with end tokens)
    stops = torch.tensor(ends, dtype=torch.long, device=device)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, width - len(e):] = torch.tensor(e)
            mask[row, width - len(e):] = 1
        ids, mask = ids.to(device), mask.to(device)
        generated = torch.empty((len(encoded), 0), dtype=torch.long, device=device)
        done = torch.zeros(len(encoded), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            generated = torch.cat([generated, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, stops)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
            if bool(done.all()):
                break
        for row in generated.tolist():
            end = next((i for i, t in enumerate(row) if t in ends), len(row))
            out.append(row[:end])
    return out


def _token_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return list(dict.fromkeys(int(i) for i in ids))


def greedy_completion(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, add_special_tokens: bool = False
) -> str:
    """The greedy answer to one ``prompt``, decoded without special tokens.

    ``tokenizer`` is a Hugging Face tokenizer; the prompt is encoded with
    ``add_special_tokens`` (default False: exactly the prompt's own tokens). Decoding stops
    after ``max_new_tokens`` tokens or at an end token: the tokenizer's ``eos_token_id`` or
    any of the model's ``generation_config.eos_token_id`` (where ``generate`` would stop).
    """
    ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    config = getattr(model, "generation_config", None)
    ends = _token_list(tokenizer.eos_token_id) + _token_list(getattr(config, "eos_token_id", None))
    new = greedy_token_ids(model, [ids], max_new_tokens, ends or None, tokenizer.pad_token_id)[0]
    return tokenizer.decode(new, skip_special_tokens=True)
