"""Token sequences and padded batches.

An ``LMExample`` marks which tokens are *targets* (predicted from the tokens before them):
a candidate chunk targets every token but the first; a query targets its completion only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass(frozen=True)
class LMExample:
    """``input_ids`` (T,) and ``target_mask`` (T,): True where token t is a scored target."""

    input_ids: tuple[int, ...]
    target_mask: tuple[bool, ...]
    label: int | None = None  # sequence-classification fine-tunes: the class to measure

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0:
            raise ValueError("LMExample has no tokens")
        if len(self.input_ids) != len(self.target_mask):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and target_mask ({len(self.target_mask)}) differ")
        if self.target_mask[0] and self.label is None:
            raise ValueError("token 0 cannot be a target: nothing precedes it")


def document_example(token_ids: Sequence[int]) -> LMExample:
    """A candidate chunk: ``log p(z)`` over every token after the first."""
    ids = tuple(int(t) for t in token_ids)
    return LMExample(ids, (False,) + (True,) * (len(ids) - 1))


def query_example(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> LMExample:
    """A query: ``log p(completion | prompt)``; prompt tokens carry no loss."""
    if not prompt_ids:
        raise ValueError("query prompt is empty: the first completion token needs a context")
    if not completion_ids:
        raise ValueError("query completion is empty: nothing to measure")
    ids = tuple(int(t) for t in prompt_ids) + tuple(int(t) for t in completion_ids)
    return LMExample(ids, (False,) * len(prompt_ids) + (True,) * len(completion_ids))


def classification_example(token_ids: Sequence[int], label: int) -> LMExample:
    """A sequence-classification query: ``log p(label | text)``."""
    ids = tuple(int(t) for t in token_ids)
    return LMExample(ids, (False,) * len(ids), label=int(label))


@dataclass
class LMBatch:
    """Right-padded batch. ``index`` (B,) maps rows back to positions in the example list."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    target_mask: torch.Tensor  # (B, T) bool
    index: torch.Tensor  # (B,) long
    labels: torch.Tensor | None = None  # (B,) long, classification only

    def to(self, device: torch.device | str) -> "LMBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return LMBatch(move(self.input_ids), move(self.attention_mask), move(self.target_mask), self.index, move(self.labels))

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def collate(examples: Sequence[LMExample], index: Sequence[int], pad_id: int) -> LMBatch:
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(example.target_mask)
    labels = None
    if any(e.label is not None for e in examples):
        if any(e.label is None for e in examples):
            raise ValueError("a batch mixes classification and language-modelling examples")
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return LMBatch(ids, attention, targets, torch.tensor(list(index), dtype=torch.long), labels)


def make_batches(
    examples: Sequence[LMExample], batch_size: int, pad_id: int, sort_by_length: bool = True
) -> Iterator[LMBatch]:
    """Batches of at most ``batch_size`` examples.

    With ``sort_by_length`` examples of similar length share a batch (less padding); each
    batch's ``index`` says where its rows came from, so results never depend on the order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(examples)))
    if sort_by_length:
        order.sort(key=lambda i: -len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield collate([examples[i] for i in chunk], chunk, pad_id)
