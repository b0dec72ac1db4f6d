"""Factor steps: per-shard covariance sums → eigenbasis → per-shard Λ sums → factors.

The pre-trained factors are map-reduced over corpus shards (sums merge exactly): each shard's
sums are fitted with its own label draws, the reduce steps merge the factor set's files and
read the module specs stored with them (no model is loaded to reduce). The fine-tuned factors
are fitted on the fine-tuning data sample in one go.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..engine import (
    CovarianceStats, EkfacFactors, LambdaStats, discover_modules, LMExample, ModuleSpec, assemble_factors,
    classification_example, eigendecompose, factor_metadata, fit_covariance, fit_lambdas, query_example,
)
from ..engine.factors import (
    covariance_from_tensors, covariance_to_tensors, eigenbasis_from_tensors, eigenbasis_to_tensors,
    lambda_from_tensors, lambda_to_tensors, specs_from_json, specs_to_json,
)
from ..lake.factor_store import load_tensors, read_metadata, save_tensors
from ..lake import tables
from ..lake.training_inputs import FinetuneData, read_finetune_file
from ..lake.layout import LakeLayout
from ..lake.models import LoadedModel
from .corpus import chunk_examples
from .models import ModelIds, check_pair, load_finetuned, load_pretrained
from .settings import ComputeSettings


def pad_id_of(loaded: LoadedModel) -> int:
    tok = loaded.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def save_covariance(path: Path, stats: CovarianceStats, extra: dict[str, str]) -> None:
    tensors, meta = covariance_to_tensors(stats)
    save_tensors(path, tensors, {**meta, **extra})


def load_covariance(path: Path) -> CovarianceStats:
    return covariance_from_tensors(*load_tensors(path))


def save_lambda(path: Path, stats: LambdaStats, extra: dict[str, str]) -> None:
    tensors, meta = lambda_to_tensors(stats)
    save_tensors(path, tensors, {**meta, **extra})


def load_lambda(path: Path) -> LambdaStats:
    return lambda_from_tensors(*load_tensors(path))


def merge_all(stats: Sequence):
    if not stats:
        raise ValueError("no factor statistics to merge: is the factor set of shards empty?")
    total = stats[0]
    for item in stats[1:]:
        total = total.merge(item)
    return total


def save_eigenbasis(path: Path, stats: CovarianceStats, specs: list[ModuleSpec], settings: ComputeSettings, extra: dict[str, str]):
    basis = eigendecompose(stats, specs, settings.split_heads)
    tensors, meta = eigenbasis_to_tensors(basis)
    save_tensors(path, tensors, {**meta, **extra, "token_count": str(stats.token_count), "specs": specs_to_json(specs)})
    return basis


def load_eigenbasis(path: Path):
    return eigenbasis_from_tensors(*load_tensors(path))


def stored_specs(path: Path) -> list[ModuleSpec]:
    """The module specs a covariance or eigenbasis file was computed for (no model needed)."""
    return specs_from_json(read_metadata(path)["specs"])


def save_factors(path: Path, factors: EkfacFactors) -> None:
    save_tensors(path, *factors.to_tensors())


def load_factors(path: Path) -> EkfacFactors:
    return EkfacFactors.from_tensors(*load_tensors(path))


def finetune_examples(data: FinetuneData, loaded: LoadedModel) -> list[LMExample]:
    """The fine-tuned model's own training distribution, as engine examples."""
    tok = loaded.tokenizer
    rows = data.table.to_pylist()
    if data.kind == "prompt_completion":
        return [query_example(_ids(tok, r["prompt"]), _ids(tok, r["completion"])) for r in rows]
    if data.kind == "classification":
        label2id = getattr(loaded.model.config, "label2id", {}) or {}
        return [classification_example(_ids(tok, r["text"]), _label_index(r["label"], label2id)) for r in rows]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    from ..engine import document_example

    return [document_example(bos + _ids(tok, r["text"])) for r in rows]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _label_index(label: str, label2id: dict) -> int:
    if label in label2id:
        return int(label2id[label])
    if label.lstrip("-").isdigit():
        return int(label)
    raise ValueError(f"label {label!r} is neither a class index nor one of the model's labels {sorted(label2id)}")


def fit_finetuned_factors(loaded: LoadedModel, specs: list[ModuleSpec], examples: list[LMExample], settings: ComputeSettings, fingerprint: str) -> EkfacFactors:
    args = settings.factor_args(pad_id_of(loaded))
    cov = fit_covariance(loaded.model, specs, examples, args)
    basis = eigendecompose(cov, specs, settings.split_heads)
    lam = fit_lambdas(loaded.model, specs, basis, examples, args)
    return assemble_factors(specs, basis, lam, factor_metadata(specs, args, cov, lam, fingerprint, settings.scope))


# -- the pre-trained factors, map-reduced over corpus shards --------------------------------


@dataclass(frozen=True)
class ShardFit:
    """What one shard's statistics step wrote."""

    path: Path
    tokens: int
    sequences: int


def shard_seed(shard: str) -> int:
    """Independent label draws per shard, reproducible from the shard's name."""
    return zlib.crc32(shard.encode()) % 100_000


def fit_shard_covariance(layout: LakeLayout, pt_dir: Path, ft_dir: Path, ids: ModelIds, shard: str, settings: ComputeSettings) -> ShardFit:
    """Σ a aᵀ, Σ s sᵀ and token counts of one shard's chunks under θ_pt, with the module specs."""
    check_pair(pt_dir, ft_dir, settings)
    pt = load_pretrained(pt_dir, settings)
    specs = discover_modules(pt.model, settings.scope)
    examples = chunk_examples(tables.read_chunks(layout, shard), pt.tokenizer.bos_token_id)
    stats = fit_covariance(pt.model, specs, examples, settings.factor_args(pad_id_of(pt), shard_seed(shard)))
    path = layout.factor_stats_file("pt", ids.pt, f"{shard}.covariance")
    save_covariance(path, stats, {"shard": shard, "specs": specs_to_json(specs)})
    return ShardFit(path, stats.token_count, len(examples))


def build_eigenbasis(layout: LakeLayout, ids: ModelIds, shards: Sequence[str], settings: ComputeSettings) -> tuple[Path, CovarianceStats, list[ModuleSpec]]:
    """Merge the factor set's covariances and eigendecompose them (float64, per head block)."""
    files = [layout.factor_stats_file("pt", ids.pt, f"{s}.covariance") for s in shards]
    stats = merge_all([load_covariance(f) for f in files])
    specs = stored_specs(files[0])
    path = layout.factors_file("pt", ids.pt, "eigenbasis")
    save_eigenbasis(path, stats, specs, settings, {"shards": ",".join(shards)})
    return path, stats, specs


def fit_shard_lambda(layout: LakeLayout, pt_dir: Path, ids: ModelIds, shard: str, settings: ComputeSettings) -> ShardFit:
    """Σ (Q_Sᵀ DW Q_A)^∘2 over one shard's chunks: the corrected eigenvalues' sums."""
    eigenbasis_file = layout.factors_file("pt", ids.pt, "eigenbasis")
    specs, basis = stored_specs(eigenbasis_file), load_eigenbasis(eigenbasis_file)
    pt = load_pretrained(pt_dir, settings)
    examples = chunk_examples(tables.read_chunks(layout, shard), pt.tokenizer.bos_token_id)
    stats = fit_lambdas(pt.model, specs, basis, examples, settings.factor_args(pad_id_of(pt), shard_seed(shard)))
    path = layout.factor_stats_file("pt", ids.pt, f"{shard}.lambda")
    save_lambda(path, stats, {"shard": shard})
    return ShardFit(path, 0, stats.sequence_count)


def assemble_pretrained_factors(layout: LakeLayout, ids: ModelIds, shards: Sequence[str], settings: ComputeSettings) -> tuple[Path, EkfacFactors]:
    """Eigenbasis + the factor set's mean corrected eigenvalues → the pre-trained factors."""
    stat = lambda shard, kind: layout.factor_stats_file("pt", ids.pt, f"{shard}.{kind}")  # noqa: E731
    lam = merge_all([load_lambda(stat(s, "lambda")) for s in shards])
    cov = merge_all([load_covariance(stat(s, "covariance")) for s in shards])
    eigenbasis_file = layout.factors_file("pt", ids.pt, "eigenbasis")
    specs, basis = stored_specs(eigenbasis_file), load_eigenbasis(eigenbasis_file)
    args = settings.factor_args(pad_id=0)  # the metadata records labels, seed and dtypes, not the pad id
    factors = assemble_factors(specs, basis, lam, factor_metadata(specs, args, cov, lam, ids.pt, settings.scope))
    path = layout.factors_file("pt", ids.pt)
    save_factors(path, factors)
    return path, factors


def fit_finetuned_step(layout: LakeLayout, pt_dir: Path, ft_dir: Path, data_file: Path, ids: ModelIds, settings: ComputeSettings) -> tuple[Path, EkfacFactors]:
    """EK-FAC factors of θ_ft on its own fine-tuning data sample."""
    check_pair(pt_dir, ft_dir, settings)
    ft = load_finetuned(ft_dir, settings)
    specs = discover_modules(ft.model, settings.scope)
    factors = fit_finetuned_factors(ft, specs, finetune_examples(read_finetune_file(data_file), ft), settings, ids.ft)
    path = layout.factors_file("ft", ids.ft)
    save_factors(path, factors)
    return path, factors
