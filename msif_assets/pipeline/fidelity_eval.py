"""EK-FAC fidelity as a lake table (the shape of the paper's Table 1): a tiny GPT-NeoX
trained on a seeded synthetic Markov chain, EK-FAC vs exact damped-GGN influence.

Table: ``eval_fidelity`` (tables.EVAL_FIDELITY).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import pyarrow as pa
import torch

from ..engine import document_example, query_example
from ..engine.fidelity import FidelityRow, fidelity_table
from ..engine.traversal import Progress
from ..lake import tables
from .evaluation import now_utc


@dataclass(frozen=True)
class FidelityConfig:
    """A tiny GPT-NeoX trained on a seeded Markov chain (each token has two successors), then
    EK-FAC fidelity against exact damped-GGN influence over its own training sequences.

    ``n_train`` is large enough that the model learns the chain rather than memorizing its
    walks: with 48 walks it reached a training loss of 0.18, below the chain's entropy floor
    (ln 2 ≈ 0.69 per token), and two thirds of its GGN's eigenvalues fell under 1e-3 — a
    memorized model is not the regime influence functions (or the paper's Table 1, a model
    trained on Penn Treebank) describe. With 256 walks the loss stays near the floor."""

    vocab: int = 16
    hidden: int = 8
    layers: int = 2
    heads: int = 2
    intermediate: int = 32
    n_train: int = 256
    seq_len: int = 10
    n_queries: int = 8
    prompt_len: int = 6
    train_steps: int = 300
    lr: float = 1e-2
    dampings: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    fisher_repeats: int = 2
    seed: int = 0

    @property
    def model_label(self) -> str:
        sizes = {k: v for k, v in asdict(self).items() if k not in ("dampings", "fisher_repeats")}
        return "markov-gpt-neox-" + "-".join(f"{k}{v}" for k, v in sizes.items())


def markov_sequences(n: int, length: int, vocab: int, chain_seed: int, draw_seed: int) -> list[list[int]]:
    """``n`` walks of ``length`` tokens on the chain of ``chain_seed`` (2 successors per token)."""
    successors = torch.randint(0, vocab, (vocab, 2), generator=torch.Generator().manual_seed(chain_seed))
    gen = torch.Generator().manual_seed(draw_seed)
    walks = []
    for _ in range(n):
        walk = [int(torch.randint(0, vocab, (1,), generator=gen))]
        for _ in range(length - 1):
            walk.append(int(successors[walk[-1], int(torch.randint(0, 2, (1,), generator=gen))]))
        walks.append(walk)
    return walks


@dataclass
class FidelityResult:
    rows: list[FidelityRow]
    final_loss: float  # training loss (token mean); uniform guessing is ln(vocab)
    n_pairs: int
    train_seconds: float
    config: FidelityConfig


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_fidelity(config: FidelityConfig = FidelityConfig(), num_threads: int = 1) -> FidelityResult:
    """Train the model (float32, Adam, full batch), then :func:`fidelity_table` in float64.

    ``num_threads``: torch CPU threads for the whole run, restored after. One by default: a
    hidden-8 model gains little from more on a quiet CPU, and on a busy one threads that wait
    for each other are ruinous (measured on 2 cores at load ~5: the exact GGN took 1.1 s per
    sequence with 2 threads, 0.16 s with 1)."""
    with _torch_threads(num_threads):
        return _run_fidelity(config)


def _run_fidelity(config: FidelityConfig) -> FidelityResult:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    started = time.perf_counter()
    train = markov_sequences(config.n_train, config.seq_len, config.vocab, config.seed, config.seed + 1)
    ids = torch.tensor(train)
    with torch.random.fork_rng():  # seeded init without touching the caller's RNG state
        torch.manual_seed(config.seed)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=config.vocab, hidden_size=config.hidden, num_hidden_layers=config.layers,
            num_attention_heads=config.heads, intermediate_size=config.intermediate,
            max_position_embeddings=config.seq_len, attn_implementation="sdpa"))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    progress = Progress(f"fidelity: training the hidden-{config.hidden} model on {config.n_train} walks, step", config.train_steps)
    progress.update(0, force=True)
    for step in range(1, config.train_steps + 1):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        progress.update(step)
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    train_seconds = time.perf_counter() - started
    model = model.double().eval()
    p = config.prompt_len
    held_out = markov_sequences(config.n_queries, config.seq_len, config.vocab, config.seed, config.seed + 2)
    queries = [query_example(s[:p], s[p:]) for s in held_out]
    docs = [document_example(s) for s in train]
    rows = fidelity_table(model, docs, queries, docs, config.dampings, config.fisher_repeats, config.seed)
    return FidelityResult(rows, loss, len(queries) * len(docs), train_seconds, config)


# ``MSIF_FIDELITY`` picks the fidelity asset's size. "small" takes a few seconds; its numbers
# mean little (8 training walks), so it is for runs that do not study fidelity: the test suite
# sets it (tests/conftest.py), and a quick look at the pipeline may.
FIDELITY_SIZES = {
    "default": FidelityConfig(),
    "small": FidelityConfig(n_train=8, train_steps=20, n_queries=2, dampings=(1e-3, 1e-1), fisher_repeats=1),
}


def fidelity_config_from_env() -> FidelityConfig:
    name = os.environ.get("MSIF_FIDELITY", "default")
    if name not in FIDELITY_SIZES:
        raise ValueError(f"MSIF_FIDELITY={name!r}; choose one of {', '.join(FIDELITY_SIZES)}")
    return FIDELITY_SIZES[name]


def fidelity_rows(result: FidelityResult, computed_at: dt.datetime | None = None) -> pa.Table:
    """EVAL_FIDELITY rows: one per (method, damping); reference = exact damped GGN."""
    now = computed_at or now_utc()
    rows = [{"method": r.method, "reference": "exact-ggn", "damping": r.damping, "spearman": r.spearman,
             "pearson": r.pearson, "n_pairs": result.n_pairs, "seconds": r.seconds,
             "model": result.config.model_label, "computed_at": now} for r in result.rows]
    return pa.Table.from_pylist(rows, schema=tables.EVAL_FIDELITY.schema)
