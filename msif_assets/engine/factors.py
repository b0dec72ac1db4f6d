"""EK-FAC factors: mergeable statistics, Kronecker eigenbases and corrected eigenvalues.

Per tracked module with ``W`` (m, n):
  * ``CovarianceStats``: Σ_t a aᵀ (n, n), Σ_t s sᵀ (m, m), token count;
  * ``Eigenbasis``: ``A = Q_A Λ_A Q_Aᵀ``, ``S = Q_S Λ_S Q_Sᵀ`` in float64 — with head split,
    ``S`` is first reduced to its block-diagonal part, one block per (head, q/k/v);
  * ``LambdaStats``: Σ_sequences (Q_Sᵀ DW Q_A)^∘2 (m, n), sequence count;
  * ``EkfacFactors``: eigenbasis + mean corrected eigenvalues ``Λ`` + metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .modules import ModuleSpec


def _merge_sums(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not left or not right:  # a partition with no tokens (an empty shard) adds nothing
        return dict(left or right)
    if left.keys() != right.keys():
        raise ValueError(f"cannot merge statistics over different modules: {sorted(left.keys() ^ right.keys())}")
    return {name: left[name] + right[name] for name in left}


@dataclass
class CovarianceStats:
    a_sums: dict[str, torch.Tensor]  # (n, n) float64
    s_sums: dict[str, torch.Tensor]  # (m, m) float64
    token_count: int

    def merge(self, other: "CovarianceStats") -> "CovarianceStats":
        return CovarianceStats(
            _merge_sums(self.a_sums, other.a_sums), _merge_sums(self.s_sums, other.s_sums), self.token_count + other.token_count
        )

    def means(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self.token_count == 0:
            raise ValueError("covariance statistics hold no tokens")
        return (
            {k: v / self.token_count for k, v in self.a_sums.items()},
            {k: v / self.token_count for k, v in self.s_sums.items()},
        )


@dataclass
class LambdaStats:
    sums: dict[str, torch.Tensor]  # (m, n) float64
    sequence_count: int

    def merge(self, other: "LambdaStats") -> "LambdaStats":
        return LambdaStats(_merge_sums(self.sums, other.sums), self.sequence_count + other.sequence_count)


@dataclass
class Eigenbasis:
    q_a: dict[str, torch.Tensor]  # (n, n)
    eig_a: dict[str, torch.Tensor]  # (n,)
    q_s: dict[str, torch.Tensor]  # (m, m), block-diagonal (in row order) when split
    eig_s: dict[str, torch.Tensor]  # (m,)
    split_heads: bool


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = 0.5 * (matrix + matrix.T)  # exact symmetry before eigh
    values, vectors = torch.linalg.eigh(matrix.double())
    return values, vectors


def eigendecompose(stats: CovarianceStats, specs: list[ModuleSpec], split_heads: bool = True) -> Eigenbasis:
    """float64 eigendecompositions of the mean covariances (per head block for q/k/v when split)."""
    a_means, s_means = stats.means()
    basis = Eigenbasis({}, {}, {}, {}, split_heads)
    for spec in specs:
        basis.eig_a[spec.name], basis.q_a[spec.name] = _eigh(a_means[spec.name])
        s_mean = s_means[spec.name]
        if split_heads and spec.head_blocks is not None:
            q_s = torch.zeros_like(s_mean, dtype=torch.float64)
            eig_s = torch.zeros(s_mean.shape[0], dtype=torch.float64, device=s_mean.device)
            for start, stop in spec.head_blocks:
                eig_s[start:stop], q_s[start:stop, start:stop] = _eigh(s_mean[start:stop, start:stop])
            basis.eig_s[spec.name], basis.q_s[spec.name] = eig_s, q_s
        else:
            basis.eig_s[spec.name], basis.q_s[spec.name] = _eigh(s_mean)
    return basis


@dataclass(frozen=True)
class FactorMetadata:
    """Everything a stored factor file must say about how it was made."""

    model_fingerprint: str
    labels: str  # "sampled" (true Fisher) or "data" (empirical Fisher)
    split_heads: bool
    scope: str
    token_count: int
    sequence_count: int
    seed: int
    dtype: str = "float64"
    stats_dtype: str = "model"
    modules: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class EkfacFactors:
    specs: list[ModuleSpec]
    eigenbasis: Eigenbasis
    lambdas: dict[str, torch.Tensor]  # (m, n) mean corrected eigenvalues, never mutated
    metadata: FactorMetadata

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def to(self, device: torch.device | str) -> "EkfacFactors":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        b = self.eigenbasis
        basis = Eigenbasis(move(b.q_a), move(b.eig_a), move(b.q_s), move(b.eig_s), b.split_heads)
        return EkfacFactors(self.specs, basis, move(self.lambdas), self.metadata)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat tensors and string metadata, ready for a safetensors file."""
        tensors: dict[str, torch.Tensor] = {}
        b = self.eigenbasis
        for name in self.names:
            for key, source in (("q_a", b.q_a), ("eig_a", b.eig_a), ("q_s", b.q_s), ("eig_s", b.eig_s), ("lambda", self.lambdas)):
                tensors[f"{name}::{key}"] = source[name].contiguous().cpu()
        meta = {k: json.dumps(v) for k, v in asdict(self.metadata).items()}
        meta["specs"] = specs_to_json(self.specs)
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "EkfacFactors":
        specs = specs_from_json(meta["specs"])
        fields = {k: json.loads(v) for k, v in meta.items() if k != "specs"}
        fields["modules"] = tuple(fields.get("modules", ()))
        metadata = FactorMetadata(**fields)
        pick = lambda key: {s.name: tensors[f"{s.name}::{key}"] for s in specs}  # noqa: E731
        basis = Eigenbasis(pick("q_a"), pick("eig_a"), pick("q_s"), pick("eig_s"), metadata.split_heads)
        return cls(specs, basis, pick("lambda"), metadata)


def specs_to_json(specs: list[ModuleSpec]) -> str:
    """Module specs as stored in factor and statistics files, so later steps need no model."""
    return json.dumps([asdict(s) for s in specs])


def specs_from_json(text: str) -> list[ModuleSpec]:
    def spec(raw: dict) -> ModuleSpec:
        blocks = raw.get("head_blocks")
        return ModuleSpec(**{**raw, "head_blocks": None if blocks is None else tuple(tuple(b) for b in blocks)})

    return [spec(raw) for raw in json.loads(text)]


def assemble_factors(
    specs: list[ModuleSpec], basis: Eigenbasis, lambda_stats: LambdaStats, metadata: FactorMetadata
) -> EkfacFactors:
    if lambda_stats.sequence_count == 0:
        raise ValueError("corrected-eigenvalue statistics hold no sequences")
    lambdas = {name: total / lambda_stats.sequence_count for name, total in lambda_stats.sums.items()}
    return EkfacFactors(specs, basis, lambdas, metadata)


def covariance_to_tensors(stats: CovarianceStats) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"{k}::a_sum": v.contiguous().cpu() for k, v in stats.a_sums.items()}
    tensors.update({f"{k}::s_sum": v.contiguous().cpu() for k, v in stats.s_sums.items()})
    return tensors, {"token_count": str(stats.token_count), "kind": "covariance"}


def covariance_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> CovarianceStats:
    pick = lambda suffix: {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}  # noqa: E731
    return CovarianceStats(pick("::a_sum"), pick("::s_sum"), int(meta["token_count"]))


def lambda_to_tensors(stats: LambdaStats) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"{k}::lambda_sum": v.contiguous().cpu() for k, v in stats.sums.items()}
    return tensors, {"sequence_count": str(stats.sequence_count), "kind": "lambda"}


def lambda_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> LambdaStats:
    sums = {k[: -len("::lambda_sum")]: v for k, v in tensors.items() if k.endswith("::lambda_sum")}
    return LambdaStats(sums, int(meta["sequence_count"]))


def eigenbasis_to_tensors(basis: Eigenbasis) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for key in ("q_a", "eig_a", "q_s", "eig_s"):
        tensors.update({f"{name}::{key}": t.contiguous().cpu() for name, t in getattr(basis, key).items()})
    return tensors, {"split_heads": json.dumps(basis.split_heads), "kind": "eigenbasis"}


def eigenbasis_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Eigenbasis:
    pick = lambda key: {k.rsplit("::", 1)[0]: v for k, v in tensors.items() if k.endswith(f"::{key}")}  # noqa: E731
    return Eigenbasis(pick("q_a"), pick("eig_a"), pick("q_s"), pick("eig_s"), json.loads(meta["split_heads"]))
