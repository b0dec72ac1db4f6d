"""The compute settings and the score key: one typed form each, from ``msif.toml`` to the score row.

``ComputeSettings`` is parsed and validated once, where the config is read
(:meth:`ComputeSettings.from_config` names the bad key and what to write instead); the Dagster
resource is generated from its fields (``defs/resources.py``), so the two cannot drift.
``ScoreKey`` (method + optional :class:`Damping`) names one column of scores: query
gradients are stored under its ``tag``, score rows carry its ``columns``, evaluations read it
back with :meth:`ScoreKey.from_columns` and show its ``label``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from ..engine import METHODS, Damping, FactorArgs
from ..engine.modules import SCOPES

BASELINES: tuple[str, ...] = ("repsim", "bm25")
ALL_METHODS: tuple[str, ...] = METHODS + BASELINES
PRECONDITIONED: tuple[str, ...] = ("ms-if", "ss-if")


class SettingsError(ValueError):
    """A bad ``[compute]`` value; the message names the key and what to write instead."""


@dataclass(frozen=True)
class ScoreKey:
    """What a column of scores was computed with: a method and, for MS-IF/SS-IF, its damping."""

    method: str
    damping: Damping | None = None

    def __post_init__(self) -> None:
        if self.method not in ALL_METHODS:
            raise ValueError(f"method {self.method!r}; choose from {list(ALL_METHODS)}")
        if (self.damping is not None) != (self.method in PRECONDITIONED):
            raise ValueError(f"{self.method}: a damping is given exactly for {list(PRECONDITIONED)}")

    @property
    def needs_query_vectors(self) -> bool:
        return self.method in METHODS

    @property
    def on_finetuned_model(self) -> bool:
        """SS-IF contracts candidates' gradients at θ_ft; every other influence method at θ_pt."""
        return self.method == "ss-if"

    @property
    def tag(self) -> str:
        """Path-safe name of the damping: ``rel-0.1``, ``abs-0.001``, ``none``."""
        return "none" if self.damping is None else self.damping.label.replace(":", "-")

    @property
    def damping_label(self) -> str:
        return "—" if self.damping is None else self.damping.label

    @property
    def label(self) -> str:
        return self.method if self.damping is None else f"{self.method}@{self.damping.label}"

    @property
    def columns(self) -> dict[str, Any]:
        """The score table's ``method``, ``damping_kind`` and ``damping`` columns."""
        d = self.damping
        return {"method": self.method, "damping_kind": None if d is None else d.mode, "damping": None if d is None else d.value}

    @classmethod
    def from_columns(cls, method: str, damping_kind: str | None, damping: float | None) -> "ScoreKey":
        return cls(method, None if damping is None else Damping(damping_kind, float(damping)))

    @property
    def order(self) -> tuple:
        """Sort order for tables: method, then damping kind and value."""
        d = self.damping
        return (self.method, "" if d is None else d.mode, -1.0 if d is None else d.value)


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ComputeSettings:
    """How factors, gradients and scores are computed (``[compute]`` in msif.toml)."""

    device: str = _help("auto (CUDA when present), cpu, cuda or cuda:<index>", "auto")
    dtype: str = _help("float32 or float64: the dtype models run and factors are used in", "float32")
    batch_size: int = _help("sequences per forward/backward batch", 8)
    max_chunk_tokens: int = _help("chunk length in tokens; 0 = the pre-trained model's window", 0)
    labels: str = _help("sampled (true Fisher, the GGN) or data (empirical Fisher) labels for the factors", "sampled")
    stats_dtype: str = _help("precision of the factor statistics' products: auto (bfloat16 where fast), model or bfloat16", "auto")
    seed: int = _help("seed of the sampled labels", 0)
    split_heads: bool = _help("per-(head, q/k/v) blocks of S for attention projections", True)
    scope: str = _help("tracked modules: all, mlp or attn", "all")
    factor_shards: tuple[str, ...] = _help("corpus shards whose chunks fit the pre-trained factors; empty = all", ())
    methods: tuple[str, ...] = _help(f"methods scored, from {', '.join(ALL_METHODS)}", ALL_METHODS)
    dampings: tuple[Damping, ...] = _help("rel:<α> (α · mean Λ per module) or abs:<λ>; each is scored", (Damping("relative", 0.1),))
    query_rank: int = _help("rank of the stored query vectors per module (truncated SVD); 0 = full rank, exact", 0)
    query_inner_rank: int = _help("MS-IF with query_rank: rank kept between the fine-tuned and the pre-trained preconditioner "
                                  "(an approximation the exact path does not make); 0 = query_rank", 0)
    query_batch_size: int = _help("queries per block: gradients, vectors and scoring hold one block at a time; 0 = all", 64)
    knn_k: int = _help("candidate chunks per query and shard from LanceDB KNN", 20)
    bm25_k: int = _help("… united with this many BM25 hits per query and shard", 0)
    all_chunks_below: int = _help("a shard of at most this many chunks is scored in full", 0)
    max_new_tokens: int = _help("length of a generated completion, for queries that give none", 8)
    trust_remote_code: bool = _help("run a model directory's own Python code (off unless you opt in)", False)
    embedding_model_dir: str = _help("sentence-transformer directory; empty = the packaged all-MiniLM-L6-v2", "")

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device={self.device!r}; use auto, cpu, cuda or cuda:<index>")
        if self.dtype not in ("float32", "float64"):
            problems.append(f"dtype={self.dtype!r}; use float32 or float64")
        try:
            self.factor_args(pad_id=0)
        except ValueError as err:
            problems.append(str(err))
        if self.scope not in SCOPES:
            problems.append(f"scope={self.scope!r}; use one of {list(SCOPES)}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            problems.append(f"methods={list(self.methods)}; choose one or more of {list(ALL_METHODS)}")
        if not self.dampings and any(m in PRECONDITIONED for m in self.methods):
            problems.append("dampings=[]; MS-IF and SS-IF need at least one, e.g. [\"rel:0.1\"]")
        for name in ("knn_k", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}; must be >= 1")
        for name in ("max_chunk_tokens", "bm25_k", "all_chunks_below", "query_rank", "query_inner_rank", "query_batch_size"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}; must be >= 0")
        if problems:
            raise SettingsError("; ".join(problems))

    # -- the config boundary (TOML / Dagster run config) --------------------------------
    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str = "[compute]") -> "ComputeSettings":
        """Parse plain config values (TOML, Dagster run config); errors name ``where`` and the key."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        values = {}
        for name, value in raw.items():
            try:
                values[name] = _parse(name, known[name].default, value)
            except (TypeError, ValueError) as err:
                raise SettingsError(f"{where}: {name} = {value!r}: {err}") from None
        try:
            return cls(**values)
        except ValueError as err:
            raise SettingsError(f"{where}: {err}") from None

    def to_config(self) -> dict[str, Any]:
        """Plain values that :meth:`from_config` reads back to an equal object."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.label if isinstance(v, Damping) else v for v in value]
            out[f.name] = value
        return out

    # -- derived ---------------------------------------------------------------------
    def factor_args(self, pad_id: int, seed_offset: int = 0) -> FactorArgs:
        return FactorArgs(labels=self.labels, seed=self.seed + seed_offset, split_heads=self.split_heads,
                          batch_size=self.batch_size, pad_id=pad_id, stats_dtype=self.stats_dtype)

    @property
    def score_keys(self) -> tuple[ScoreKey, ...]:
        """Every score column configured: MS-IF/SS-IF once per damping, the rest once."""
        keys: list[ScoreKey] = []
        for method in ALL_METHODS:
            if method in self.methods:
                keys += [ScoreKey(method, d) for d in self.dampings] if method in PRECONDITIONED else [ScoreKey(method)]
        return tuple(keys)

    @property
    def gradient_keys(self) -> tuple[ScoreKey, ...]:
        """The score keys that need a (preconditioned) query gradient."""
        return tuple(k for k in self.score_keys if k.needs_query_vectors)

    @property
    def inner_rank(self) -> int:
        """MS-IF's rank between its two preconditioners (low-rank path only)."""
        return self.query_inner_rank or self.query_rank

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def in_factor_set(self, shard: str) -> bool:
        return not self.factor_shards or shard in self.factor_shards


def _parse(name: str, default: Any, value: Any) -> Any:
    """One config value, typed like the field's default (bool is not an int here)."""
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        return tuple(Damping.parse(v) for v in value) if name == "dampings" else tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("expected an integer")
        return value
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value
