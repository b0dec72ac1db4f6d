"""Sizes of the embedded default world, and the compute settings the lake uses on it."""

from __future__ import annotations

from dataclasses import dataclass

from .train import TrainConfig
from .world import WorldConfig

# The paper's damping grid: absolute 1e-4 … 1e-1 and the relative heuristic 0.1 × mean Λ.
DAMPING_GRID = ["abs:0.0001", "abs:0.001", "abs:0.01", "abs:0.1", "rel:0.1"]


@dataclass(frozen=True)
class DemoSize:
    world: WorldConfig
    train: TrainConfig
    max_queries: int  # held-out queries attributed in the lake (every one costs a backward pass per candidate)


SIZES: dict[str, DemoSize] = {
    "default": DemoSize(WorldConfig(), TrainConfig(), max_queries=40),
    "tiny": DemoSize(
        WorldConfig(n_finetune_entities=16, n_heldout_entities=6, docs_per_fact=2, n_distractor_docs=8, n_shards=2,
                    relations=("birth_city", "employer", "occupation")),
        TrainConfig(hidden_size=32, num_layers=2, num_heads=2, max_length=64, pretrain_epochs=4, finetune_epochs=1),
        max_queries=6,
    ),
}


def demo_size(name: str) -> DemoSize:
    if name not in SIZES:
        raise ValueError(f"[demo] size={name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


def demo_compute_defaults(size: str) -> dict:
    """Every chunk is a candidate (the world is small enough to rank the full corpus, which the
    fact-tracing evaluation needs), over the paper's damping grid."""
    demo_size(size)
    return {"dampings": list(DAMPING_GRID), "all_chunks_below": 1_000_000, "batch_size": 16}
