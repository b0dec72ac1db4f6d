"""Greedy decoding: agrees with Hugging Face ``generate(do_sample=False)`` and is padding-invariant."""

from __future__ import annotations

import pytest
import torch

from msif_assets.engine.generation import greedy_completion, greedy_token_ids

from .reference import build_tiny, random_sequences

EOS, PAD = 2, 0


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def model(request, tmp_path_factory):
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


def _generate(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=PAD)
    new = out[0, ids.shape[1]:].tolist()
    return new[: new.index(eos)] if eos is not None and eos in new else new


def test_matches_hf_greedy_generate(model, monkeypatch):
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)  # generate: no default end token
    prompts = random_sequences(5, seed=7)
    free = greedy_token_ids(model, prompts, 6, eos_token_id=None, pad_token_id=PAD)
    assert all(len(row) == 6 for row in free)
    assert free == [_generate(model, p, 6, None) for p in prompts]
    # A token the model does emit, used as <eos>: every row is cut before its first occurrence.
    eos = free[0][2]
    cut = greedy_token_ids(model, prompts, 6, eos_token_id=eos)
    assert cut == [row[: row.index(eos)] if eos in row else row for row in free]
    assert cut == [_generate(model, p, 6, eos) for p in prompts]
    # Several end tokens: a row stops at whichever comes first.
    other = free[1][1]
    both = greedy_token_ids(model, prompts, 6, eos_token_id=[eos, other])
    assert both == [row[: min([row.index(t) for t in (eos, other) if t in row], default=6)] for row in free]


def test_left_padded_batches_match_one_by_one(model):
    prompts = random_sequences(7, seed=3, low=2, high=12)
    batched = greedy_token_ids(model, prompts, 4, EOS, PAD, batch_size=len(prompts))
    assert batched == [greedy_token_ids(model, [p], 4, EOS, PAD)[0] for p in prompts]
    assert greedy_token_ids(model, prompts, 4, EOS, PAD, batch_size=3) == batched
    with pytest.raises(ValueError, match="non-empty prompt"):
        greedy_token_ids(model, [[5], []], 2, EOS)


class _WordTokenizer:
    """The members ``greedy_completion`` uses, over words ``w<id>``; ids 0-2 and ``eos`` are special."""

    pad_token_id = PAD

    def __init__(self, eos: int) -> None:
        self.eos_token_id = eos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [int(w[1:]) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = {0, 1, 2, self.eos_token_id}
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in special))


def _generate_completion(model, tok: _WordTokenizer, prompt: str, max_new_tokens: int) -> str:
    """The ``model.generate`` route ``greedy_completion`` replaces (pipeline/queries.py before it)."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_completion_matches_the_generate_route(model):
    assert model.generation_config.eos_token_id == EOS
    prompts = [" ".join(f"w{i}" for i in p) for p in random_sequences(6, seed=11)]
    emitted = greedy_token_ids(model, [_WordTokenizer(EOS)(p, False)["input_ids"] for p in prompts], 8, None)
    # The tokenizer's <eos> equal to the model's, and a different one the model does emit.
    for eos in (EOS, emitted[0][3]):
        tok = _WordTokenizer(eos)
        got = [greedy_completion(model, tok, p, 8) for p in prompts]
        assert got == [_generate_completion(model, tok, p, 8) for p in prompts]
