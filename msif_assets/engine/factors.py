"""EK-FAC factors: mergeable statistics, Kronecker eigenbases and corrected eigenvalues.

Per tracked module with ``W`` (m, n):
  * ``CovarianceStats``: Σ_t a aᵀ (n, n), Σ_t s sᵀ (m, m), token count;
  * ``Eigenbasis``: ``A = Q_A Λ_A Q_Aᵀ``, ``S = Q_S Λ_S Q_Sᵀ`` in float64 — with head split,
    ``S`` is first reduced to its block-diagonal part, one block per (head, q/k/v);
  * ``LambdaStats``: Σ_sequences (Q_Sᵀ DW Q_A)^∘2 (m, n), sequence count;
  * ``EkfacFactors``: eigenbasis + mean corrected eigenvalues ``Λ`` + metadata.

``Eigenbasis`` and ``EkfacFactors`` hold ``Mapping[str, Tensor]`` per kind, keyed by module
name: in-memory dicts, or lazy mappings that read one module's tensor from a file on each
lookup (``from_tensors`` over a lazy mapping; ``select`` materializes some modules).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Mapping, NamedTuple

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


BASIS_KEYS: tuple[str, ...] = ("q_a", "eig_a", "q_s", "eig_s")
FACTOR_KEYS: tuple[str, ...] = BASIS_KEYS + ("lambda",)


@dataclass
class Eigenbasis:
    """Per module (possibly lazily read mappings, see the module docstring)."""

    q_a: Mapping[str, torch.Tensor]  # (n, n)
    eig_a: Mapping[str, torch.Tensor]  # (n,)
    q_s: Mapping[str, torch.Tensor]  # (m, m), block-diagonal (in row order) when split
    eig_s: Mapping[str, torch.Tensor]  # (m,)
    split_heads: bool

    def select(self, names: Iterable[str]) -> "Eigenbasis":
        """In-memory dicts of ``names``' tensors (each read once when the basis is lazy)."""
        names = list(names)
        q_a, eig_a, q_s, eig_s = ({n: source[n] for n in names} for source in (self.q_a, self.eig_a, self.q_s, self.eig_s))
        return Eigenbasis(q_a, eig_a, q_s, eig_s, self.split_heads)


class ModuleBasis(NamedTuple):
    """One module's eigendecompositions, float64: ``A = q_a diag(eig_a) q_aᵀ`` (n, n), (n,);
    ``S ≈ q_s diag(eig_s) q_sᵀ`` (m, m), (m,)."""

    q_a: torch.Tensor
    eig_a: torch.Tensor
    q_s: torch.Tensor
    eig_s: torch.Tensor


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = 0.5 * (matrix + matrix.T)  # exact symmetry before eigh
    values, vectors = torch.linalg.eigh(matrix.double())
    return values, vectors


def eigendecompose_module(a_mean: torch.Tensor, s_mean: torch.Tensor, spec: ModuleSpec, split_heads: bool) -> ModuleBasis:
    """float64 eigendecompositions of one module's mean covariances ``a_mean`` (n, n) and
    ``s_mean`` (m, m), on their device; ``s_mean`` per (head, q/k/v) block when split."""
    eig_a, q_a = _eigh(a_mean)
    if split_heads and spec.head_blocks is not None:
        q_s = torch.zeros_like(s_mean, dtype=torch.float64)
        eig_s = torch.zeros(s_mean.shape[0], dtype=torch.float64, device=s_mean.device)
        for start, stop in spec.head_blocks:
            eig_s[start:stop], q_s[start:stop, start:stop] = _eigh(s_mean[start:stop, start:stop])
    else:
        eig_s, q_s = _eigh(s_mean)
    return ModuleBasis(q_a, eig_a, q_s, eig_s)


def eigendecompose(stats: CovarianceStats, specs: list[ModuleSpec], split_heads: bool = True) -> Eigenbasis:
    """float64 eigendecompositions of the mean covariances (per head block for q/k/v when split),
    one module at a time (:func:`eigendecompose_module` on ``sum / token_count``)."""
    if stats.token_count == 0:
        raise ValueError("covariance statistics hold no tokens")
    parts: dict[str, dict[str, torch.Tensor]] = {key: {} for key in BASIS_KEYS}
    for spec in specs:
        a_mean = stats.a_sums[spec.name] / stats.token_count
        s_mean = stats.s_sums[spec.name] / stats.token_count
        module = eigendecompose_module(a_mean, s_mean, spec, split_heads)
        for key in BASIS_KEYS:
            parts[key][spec.name] = getattr(module, key)
    return Eigenbasis(parts["q_a"], parts["eig_a"], parts["q_s"], parts["eig_s"], split_heads)


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


class _ModuleView(Mapping[str, torch.Tensor]):
    """``{module: source[f"{module}::{key}"]}`` over ``names``, looked up on each access."""

    def __init__(self, source: Mapping[str, torch.Tensor], names: list[str], key: str) -> None:
        self._source, self._names, self._key = source, dict.fromkeys(names), key

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._source[f"{name}::{self._key}"]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class EkfacFactors:
    """Eigenbasis + ``lambdas`` (m, n) per module, dicts or lazily read mappings: a lazy set
    reads a module's tensor from its file on every lookup; ``select`` materializes modules."""

    specs: list[ModuleSpec]
    eigenbasis: Eigenbasis
    lambdas: Mapping[str, torch.Tensor]  # (m, n) mean corrected eigenvalues, never mutated
    metadata: FactorMetadata

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def select(self, names: Iterable[str]) -> "EkfacFactors":
        """A copy holding only ``names`` (in spec order), in memory (dicts); ``metadata`` is
        unchanged (it describes the whole fit). ``select(f.names)`` materializes a lazy set."""
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown:
            raise KeyError(f"no factors for modules {sorted(unknown)}")
        specs = [s for s in self.specs if s.name in wanted]
        chosen = [s.name for s in specs]
        return EkfacFactors(specs, self.eigenbasis.select(chosen), {n: self.lambdas[n] for n in chosen}, self.metadata)

    def to(self, device: torch.device | str) -> "EkfacFactors":
        """Every tensor moved to ``device``, in dicts (reads every tensor of a lazy set)."""
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        b = self.eigenbasis
        basis = Eigenbasis(move(b.q_a), move(b.eig_a), move(b.q_s), move(b.eig_s), b.split_heads)
        return EkfacFactors(self.specs, basis, move(self.lambdas), self.metadata)

    def module_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """``{f"{name}::{key}": tensor}`` for one module's ``FACTOR_KEYS``, as stored in a file."""
        b = self.eigenbasis
        sources = {"q_a": b.q_a, "eig_a": b.eig_a, "q_s": b.q_s, "eig_s": b.eig_s, "lambda": self.lambdas}
        return {f"{name}::{key}": sources[key][name] for key in FACTOR_KEYS}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat CPU tensors and string metadata, ready for a safetensors file (reads every
        tensor of a lazy set: stream big sets module by module with ``module_tensors``)."""
        tensors = {k: v.contiguous().cpu() for name in self.names for k, v in self.module_tensors(name).items()}
        return tensors, factor_file_metadata(self.metadata, self.specs)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> "EkfacFactors":
        """From flat ``<module>::<key>`` tensors: a dict is picked eagerly (as stored); any
        other mapping (a lazily read file) is wrapped without reading a tensor."""
        specs = specs_from_json(meta["specs"])
        fields = {k: json.loads(v) for k, v in meta.items() if k != "specs"}
        fields["modules"] = tuple(fields.get("modules", ()))
        metadata = FactorMetadata(**fields)
        names = [s.name for s in specs]
        if isinstance(tensors, dict):
            pick = lambda key: {name: tensors[f"{name}::{key}"] for name in names}  # noqa: E731
        else:
            missing = [f"{n}::{k}" for n in names for k in FACTOR_KEYS if f"{n}::{k}" not in tensors]
            if missing:
                raise KeyError(f"factor tensors missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            pick = lambda key: _ModuleView(tensors, names, key)  # noqa: E731
        basis = Eigenbasis(pick("q_a"), pick("eig_a"), pick("q_s"), pick("eig_s"), metadata.split_heads)
        return cls(specs, basis, pick("lambda"), metadata)


def factor_file_metadata(metadata: FactorMetadata, specs: list[ModuleSpec]) -> dict[str, str]:
    """The string metadata of a factors file: JSON-encoded fields plus the module specs."""
    meta = {k: json.dumps(v) for k, v in asdict(metadata).items()}
    meta["specs"] = specs_to_json(specs)
    return meta


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
    """Flat ``<module>::a_sum`` / ``::s_sum`` tensors on their device (``save_tensors`` moves
    one at a time to CPU as it writes) and string metadata."""
    tensors = {f"{k}::a_sum": v for k, v in stats.a_sums.items()}
    tensors.update({f"{k}::s_sum": v for k, v in stats.s_sums.items()})
    return tensors, {"token_count": str(stats.token_count), "kind": "covariance"}


def covariance_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> CovarianceStats:
    pick = lambda suffix: {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}  # noqa: E731
    return CovarianceStats(pick("::a_sum"), pick("::s_sum"), int(meta["token_count"]))


def lambda_to_tensors(stats: LambdaStats) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat ``<module>::lambda_sum`` tensors on their device and string metadata."""
    tensors = {f"{k}::lambda_sum": v for k, v in stats.sums.items()}
    return tensors, {"sequence_count": str(stats.sequence_count), "kind": "lambda"}


def lambda_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> LambdaStats:
    sums = {k[: -len("::lambda_sum")]: v for k, v in tensors.items() if k.endswith("::lambda_sum")}
    return LambdaStats(sums, int(meta["sequence_count"]))


def eigenbasis_metadata(split_heads: bool) -> dict[str, str]:
    return {"split_heads": json.dumps(split_heads), "kind": "eigenbasis"}


def eigenbasis_to_tensors(basis: Eigenbasis) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat ``<module>::<key>`` tensors on their device (reads a lazy basis) and metadata."""
    tensors = {}
    for key in BASIS_KEYS:
        tensors.update({f"{name}::{key}": t for name, t in getattr(basis, key).items()})
    return tensors, eigenbasis_metadata(basis.split_heads)


def eigenbasis_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Eigenbasis:
    pick = lambda key: {k.rsplit("::", 1)[0]: v for k, v in tensors.items() if k.endswith(f"::{key}")}  # noqa: E731
    return Eigenbasis(*(pick(key) for key in BASIS_KEYS), json.loads(meta["split_heads"]))
