"""Token sequences and padded batches for the demo trainings.

A training example is a list of token ids plus a parallel list of labels (``-100`` = no loss).
Batches are right-padded; examples of similar length are batched together so little compute
goes to padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """``input_ids`` and ``labels`` of equal length; ``labels[i]`` is the target *at* position i
    (Hugging Face causal-LM convention: the model shifts internally)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    labels: torch.Tensor  # (B, T) long, IGNORE on padding and on no-loss tokens

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def document_example(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> Example:
    """``<bos> text <eos>``, truncated to ``max_length`` tokens, loss on every token."""
    ids = list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return Example(tuple(ids), tuple(ids))


def qa_example(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int) -> Example:
    """``<bos> prompt completion <eos>`` with loss on the completion tokens and ``<eos>`` only."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(completion_ids) > max_length:
        raise ValueError(
            f"QA pair longer than max_length={max_length} tokens: prompt {prompt!r}; "
            "raise TrainConfig.max_length or shorten the prompt"
        )
    return Example(tuple(prompt_ids + completion_ids), tuple([IGNORE] * len(prompt_ids) + completion_ids))


def collate(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)


def length_bucketed_batches(
    examples: list[Example], batch_size: int, rng: random.Random, pool_batches: int = 32
) -> list[list[Example]]:
    """Shuffle, sort within pools of ``pool_batches`` batches by length, cut, shuffle the batches."""
    order = list(examples)
    rng.shuffle(order)
    batches: list[list[Example]] = []
    pool = batch_size * pool_batches
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda e: len(e.input_ids))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
