"""Non-gradient baselines of METHOD.md's "Scores" table: RepSim and BM25.

RepSim
    ``score(z, q) = cos(h̄_pt(z), h̄_ft(q))`` where ``h̄`` is the mean over non-padding
    tokens of the last-block hidden states; the candidate ``z`` is run through the
    pre-trained model, the query (prompt + completion tokens) through the fine-tuned one.

    Which hidden states: by default (``layer="final_norm"``) the base model's
    ``last_hidden_state``, i.e. the last block's output *after* the model's final
    normalisation (GPT-NeoX ``final_layer_norm``, GPT-2/BLOOM ``ln_f``, Llama ``norm``).
    In transformers 5.x this is exactly ``hidden_states[-1]`` of
    ``output_hidden_states=True`` for all four architectures (GPT-NeoX, GPT-2 and Llama
    overwrite the last captured state with ``last_hidden_state``; BLOOM appends its
    ``ln_f`` output), so it is consistent across them and is what the LM head reads.
    ``layer="last_block"`` takes the raw output of the last block (the residual stream
    before the final norm) via a forward hook instead.

BM25
    :class:`BM25Index`, a thin wrapper over the ``bm25s`` library (Lucene variant,
    ``k1=1.5``, ``b=0.75`` by default) with bm25s's own tokenizer: lowercased,
    ``\\b\\w\\w+\\b`` tokens, English stopwords removed by default (``stopwords=None``
    keeps them), no stemming.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import bm25s
import numpy as np
import torch
from torch import nn

from msif_assets.engine.batching import LMBatch
from msif_assets.engine.metrics import rank_by_score

__all__ = [
    "BM25Index",
    "RepSimLayer",
    "mean_pooled_hidden_states",
    "representation_similarity",
]

RepSimLayer = Literal["final_norm", "last_block"]


# ----------------------------------------------------------------------- RepSim


def _last_block(base: nn.Module) -> nn.Module:
    """The last transformer block: the unique direct ``ModuleList`` child of length num_hidden_layers."""
    n_layers = base.config.num_hidden_layers
    lists = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(lists) != 1:
        raise ValueError(
            f"cannot locate the block list of {type(base).__name__}: found {len(lists)} "
            f"ModuleList children of length {n_layers}"
        )
    return lists[0][-1]


def mean_pooled_hidden_states(
    model: nn.Module, batches: Iterable[LMBatch], *, layer: RepSimLayer = "final_norm"
) -> torch.Tensor:
    """Mean over non-padding tokens of the last-block hidden states, one row per sequence.

    ``batches`` are :class:`~msif_assets.engine.batching.LMBatch` es, e.g. from
    ``make_batches(examples, batch_size, pad_id)``: row ``i`` of the result is the example
    with ``index == i`` (the batches' ``index`` values must be exactly ``0 .. N-1``), so the
    order of the batches and of their rows changes nothing. Only ``input_ids`` and
    ``attention_mask`` are read (target masks and labels are ignored).

    ``model`` is any Hugging Face transformer (``*ForCausalLM``,
    ``*ForSequenceClassification`` or a bare base model); its ``base_model`` is run, so no
    head is involved. Runs under ``torch.no_grad()`` in eval mode (the model's mode is
    restored afterwards), on the model's device. Returns float64 (N, d) on the CPU.
    """
    if layer not in ("final_norm", "last_block"):
        raise ValueError(f"layer must be 'final_norm' or 'last_block', got {layer!r}")
    base = model.base_model
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = None
    if layer == "last_block":

        def _capture(_module: nn.Module, _inputs: object, output: object) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        hook = _last_block(base).register_forward_hook(_capture)

    was_training = model.training
    model.eval()
    pooled: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, LMBatch):
                    raise TypeError(f"expected LMBatch, got {type(batch).__name__}")
                rows.append(batch.index.reshape(-1).cpu())
                mask = batch.attention_mask.to(device)
                out = base(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
                hidden = captured.pop() if hook is not None else out.last_hidden_state
                weights = mask.to(torch.float64).unsqueeze(-1)  # (B, T, 1)
                summed = (hidden.to(torch.float64) * weights).sum(dim=1)  # (B, d)
                pooled.append((summed / weights.sum(dim=1)).cpu())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if not pooled:
        raise ValueError("no batches given")
    index = torch.cat(rows)
    if not torch.equal(index.sort().values, torch.arange(index.numel())):
        raise ValueError("the batches' index values must be 0 .. N-1, each exactly once")
    values = torch.cat(pooled, dim=0)
    out = torch.empty_like(values)
    out[index] = values
    return out


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # Same zero-norm guard as torch.nn.functional.normalize (eps = 1e-12).
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def representation_similarity(
    pt_model: nn.Module,
    ft_model: nn.Module,
    candidate_batches: Iterable[LMBatch],
    query_batches: Iterable[LMBatch],
    *,
    layer: RepSimLayer = "final_norm",
) -> torch.Tensor:
    """RepSim scores, float64 (N_candidates, Q) on the CPU.

    Entry (i, j) is the cosine similarity between candidate i's mean-pooled hidden state
    under ``pt_model`` and query j's (prompt + completion tokens) under ``ft_model``.
    Batching and padding change nothing beyond float tolerance. See the module docstring
    for which hidden states ``layer`` selects.
    """
    queries = _unit_rows(mean_pooled_hidden_states(ft_model, query_batches, layer=layer))
    candidates = _unit_rows(mean_pooled_hidden_states(pt_model, candidate_batches, layer=layer))
    if candidates.shape[1] != queries.shape[1]:
        raise ValueError(
            f"hidden sizes differ: pre-trained {candidates.shape[1]}, fine-tuned {queries.shape[1]}"
        )
    return candidates @ queries.T


# ------------------------------------------------------------------------- BM25


def _tokenize(texts: list[str], stopwords: str | None) -> list[list[str]]:
    return bm25s.tokenize(texts, lower=True, stopwords=stopwords, return_ids=False, show_progress=False)


@dataclass(frozen=True)
class BM25Index:
    """A BM25 index over a pool of documents with string ids; build with :meth:`build`.

    Scores are float64 copies of bm25s's float32 scores. IDF and length statistics come
    from the whole pool, also in :meth:`scores_for`.
    """

    ids: tuple[str, ...]
    stopwords: str | None
    _retriever: bm25s.BM25 = field(repr=False, compare=False)
    _row: dict[str, int] = field(repr=False, compare=False)

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        ids: Sequence[str],
        *,
        stopwords: str | None = "en",
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
    ) -> BM25Index:
        """Index ``texts`` (N,) under ``ids`` (N,). ``stopwords``: a bm25s language code or None."""
        if len(texts) == 0:
            raise ValueError("cannot build a BM25 index over an empty pool")
        if len(texts) != len(ids):
            raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError("ids contains duplicates")
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        retriever.index(_tokenize(list(texts), stopwords), show_progress=False)
        return cls(tuple(ids), stopwords, retriever, {doc_id: i for i, doc_id in enumerate(ids)})

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``: float64 (N,), aligned with ``ids``.

        Raises ``ValueError`` if the query has no tokens after tokenization (empty, or
        only stopwords / one-character tokens). Tokens absent from the pool score 0.
        """
        tokens = _tokenize([query], self.stopwords)[0]
        if not tokens:
            raise ValueError(f"query {query!r} has no BM25 tokens after tokenization")
        token_ids = self._retriever.get_tokens_ids(tokens)
        return np.asarray(self._retriever.get_scores_from_ids(token_ids), dtype=np.float64)

    def top_k(self, query: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` best ``(id, score)`` pairs, best first; ties broken by id (see ``rank_by_score``)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = self.scores(query)
        ranked = rank_by_score(list(self.ids), scores)[:k]
        return [(doc_id, float(scores[self._row[doc_id]])) for doc_id in ranked]

    def scores_for(self, query: str, ids_subset: Sequence[str]) -> np.ndarray:
        """Scores of the documents ``ids_subset`` (M,), in that order: float64 (M,)."""
        missing = [doc_id for doc_id in ids_subset if doc_id not in self._row]
        if missing:
            raise KeyError(f"{len(missing)} ids not in the index, e.g. {missing[:5]}")
        scores = self.scores(query)
        return scores[[self._row[doc_id] for doc_id in ids_subset]]
