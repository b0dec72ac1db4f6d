"""Typed, validated settings for the compute steps (mirrored by the Dagster resources)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import METHODS, Damping
from ..engine.modules import SCOPES

ALL_METHODS: tuple[str, ...] = METHODS + ("repsim", "bm25")


@dataclass(frozen=True)
class ComputeSettings:
    """How factors, gradients and scores are computed.

    * ``device``: ``auto`` picks CUDA when present. ``dtype``: float32 (default) or float64.
    * ``max_chunk_tokens``: chunk length; 0 = the model's window (``max_position_embeddings``).
    * ``stats_dtype``: precision of the factor statistics' products (``auto``: bfloat16 on
      hardware with fast bf16 GEMMs for a float32 model; ``model``: never lowered).
    * ``factor_shards``: corpus shards whose chunks fit the pre-trained factors; empty = all.
    * ``dampings``: ``rel:<α>`` (α · mean Λ per module) or ``abs:<λ>``; each is scored.
    * candidates per shard: ``knn_k`` nearest chunks per query, ∪ ``bm25_k`` lexical hits;
      a shard of at most ``all_chunks_below`` chunks is scored in full.
    """

    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 8
    max_chunk_tokens: int = 0
    labels: str = "sampled"
    stats_dtype: str = "auto"
    seed: int = 0
    split_heads: bool = True
    scope: str = "all"
    factor_shards: tuple[str, ...] = ()
    methods: tuple[str, ...] = ALL_METHODS
    dampings: tuple[str, ...] = ("rel:0.1",)
    knn_k: int = 20
    bm25_k: int = 0
    all_chunks_below: int = 0
    max_new_tokens: int = 8
    trust_remote_code: bool = False
    embedding_model_dir: str = ""

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}; use auto, cpu, cuda or cuda:<index>")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r}; use float32 or float64")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}; use one of {SCOPES}")
        unknown = set(self.methods) - set(ALL_METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods={list(self.methods)}; choose from {list(ALL_METHODS)}")
        for text in self.dampings:
            Damping.parse(text)
        for name in ("batch_size", "knn_k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    @property
    def damping_list(self) -> list[Damping]:
        return [Damping.parse(text) for text in self.dampings]

    def in_factor_set(self, shard: str) -> bool:
        return not self.factor_shards or shard in self.factor_shards
