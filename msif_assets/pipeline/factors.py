"""Factor steps: per-shard covariance sums → eigenbasis → per-shard Λ sums → factors.

The pre-trained factors are map-reduced over corpus shards (sums merge exactly); the
fine-tuned factors are fitted on the fine-tuning data sample in one go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..engine import (
    CovarianceStats, EkfacFactors, FactorArgs, LambdaStats, LMExample, ModuleSpec, assemble_factors,
    classification_example, eigendecompose, factor_metadata, fit_covariance, fit_lambdas, query_example,
)
from ..engine.factors import (
    covariance_from_tensors, covariance_to_tensors, eigenbasis_from_tensors, eigenbasis_to_tensors,
    lambda_from_tensors, lambda_to_tensors,
)
from ..lake.factor_store import load_tensors, save_tensors
from ..lake.inputs import FinetuneData
from ..lake.models import LoadedModel
from .settings import ComputeSettings


def factor_args(settings: ComputeSettings, pad_id: int, seed_offset: int = 0) -> FactorArgs:
    return FactorArgs(settings.labels, settings.seed + seed_offset, settings.split_heads, settings.batch_size, pad_id, settings.stats_dtype)


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
    save_tensors(path, tensors, {**meta, **extra, "token_count": str(stats.token_count)})
    return basis


def load_eigenbasis(path: Path):
    return eigenbasis_from_tensors(*load_tensors(path))


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
    args = factor_args(settings, pad_id_of(loaded))
    cov = fit_covariance(loaded.model, specs, examples, args)
    basis = eigendecompose(cov, specs, settings.split_heads)
    lam = fit_lambdas(loaded.model, specs, basis, examples, args)
    return assemble_factors(specs, basis, lam, factor_metadata(specs, args, cov, lam, fingerprint, settings.scope))
