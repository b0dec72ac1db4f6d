"""Factor steps: per-shard covariance sums → eigenbasis → per-shard Λ sums → factors.

The pre-trained factors are map-reduced over corpus shards (sums merge exactly): each shard's
sums are fitted with its own label draws, the reduce steps merge the factor set's files and
read the module specs stored with them (no model is loaded to reduce). The fine-tuned factors
are fitted on the fine-tuning data sample (covariance, eigenbasis and factor files of their own).

The reduce steps stream one module at a time (:func:`write_eigenbasis`, :func:`write_factors`,
shared by both factor sets): each module's sums are added over the files in shard order,
eigendecomposed or divided, and written before the next module is read, so memory holds one
module's tensors (a factor file of a 410M model is ~10 GB). Factor and eigenbasis files are read
back lazily (:class:`TensorFile`): ``factors.select(factors.names)`` puts a set in memory.
"""

from __future__ import annotations

import json
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..engine import (
    CovarianceStats, Eigenbasis, EkfacFactors, FactorMetadata, LambdaStats, discover_modules, LMExample, ModuleSpec,
    assemble_factors, classification_example, eigendecompose, factor_metadata, fit_covariance, fit_lambdas, query_example,
)
from ..engine.factors import (
    BASIS_KEYS, covariance_from_tensors, covariance_to_tensors, eigenbasis_metadata, eigendecompose_module,
    factor_file_metadata, lambda_from_tensors, lambda_to_tensors, specs_from_json, specs_to_json,
)
from ..engine.traversal import Progress, model_device
from ..lake.factor_store import StreamingTensorWriter, TensorFile, load_tensors, read_metadata, save_tensors
from ..lake import tables
from ..lake.chat import render_chat
from ..lake.inputs import InputError
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


def load_eigenbasis(path: Path) -> Eigenbasis:
    """The eigenbasis file, read lazily (one module's tensor per lookup)."""
    tf = TensorFile(path)
    return Eigenbasis(*(tf.view(key) for key in BASIS_KEYS), json.loads(tf.metadata["split_heads"]))


def stored_specs(path: Path) -> list[ModuleSpec]:
    """The module specs a covariance or eigenbasis file was computed for (no model needed)."""
    return specs_from_json(read_metadata(path)["specs"])


def save_factors(path: Path, factors: EkfacFactors) -> None:
    """Write an in-memory factor set (every tensor at once; the steps use :func:`write_factors`)."""
    save_tensors(path, *factors.to_tensors())


def load_factors(path: Path) -> EkfacFactors:
    """The factors file, read lazily: each ``q_a[name]``/``lambdas[name]``... lookup reads that
    tensor from disk (no cache); ``.select(names)`` holds some or all modules in memory."""
    tf = TensorFile(path)
    return EkfacFactors.from_tensors(tf, tf.metadata)


# -- per-module reduce: shared by the pre-trained and the fine-tuned factors -----------------


def _same_modules(sources: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Every non-empty source holds the same modules (an empty one, from a shard without
    tokens, adds nothing), as ``CovarianceStats.merge`` / ``LambdaStats.merge`` require."""
    sets = [set(s) for s in sources if len(s)]
    for other in sets[1:]:
        if other != sets[0]:
            raise ValueError(f"cannot merge statistics over different modules: {sorted(other ^ sets[0])}")


def _module_sum(sources: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    """``((s0 + s1) + s2) + ...`` of one module over the sources holding it: the same additions,
    in the same order, as merging whole statistics."""
    total: torch.Tensor | None = None
    for source in sources:
        if name in source:
            total = source[name] if total is None else total + source[name]
    if total is None:
        raise ValueError(f"no statistics file holds sums for module {name}")
    return total


def _basis_plan(spec: ModuleSpec) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    n, m = spec.d_in, spec.d_out
    shapes = {"q_a": (n, n), "eig_a": (n,), "q_s": (m, m), "eig_s": (m,)}
    return [(f"{spec.name}::{key}", torch.float64, shapes[key]) for key in BASIS_KEYS]


def write_eigenbasis(
    path: Path, a_sums: Sequence[Mapping[str, torch.Tensor]], s_sums: Sequence[Mapping[str, torch.Tensor]], token_count: int,
    specs: list[ModuleSpec], split_heads: bool, extra: Mapping[str, str], device: torch.device | str = "cpu",
) -> Path:
    """Per module: Σ_files a_sum (n, n) and s_sum (m, m) / ``token_count`` on ``device``,
    :func:`eigendecompose_module`, written (``<module>::q_a|eig_a|q_s|eig_s``, float64) before the
    next module is read. ``a_sums``/``s_sums``: one ``{module: sum}`` mapping per file, in
    shard order (lazy views of covariance files). Bit-identical to ``eigendecompose`` of the
    merged statistics computed on the same device."""
    if token_count == 0:
        raise ValueError("covariance statistics hold no tokens")
    _same_modules(a_sums)
    _same_modules(s_sums)
    meta = {**eigenbasis_metadata(split_heads), **extra, "token_count": str(token_count), "specs": specs_to_json(specs)}
    progress = Progress("eigendecomposition: module", len(specs))
    with StreamingTensorWriter(path, [e for spec in specs for e in _basis_plan(spec)], meta) as out:
        for done, spec in enumerate(specs, start=1):
            progress.update(done, spec.name)
            a_mean = _module_sum(a_sums, spec.name).to(device) / token_count
            s_mean = _module_sum(s_sums, spec.name).to(device) / token_count
            module = eigendecompose_module(a_mean, s_mean, spec, split_heads)
            del a_mean, s_mean
            for key in BASIS_KEYS:
                out.write(f"{spec.name}::{key}", getattr(module, key))
    return path


def write_factors(
    path: Path, specs: list[ModuleSpec], basis: Eigenbasis, lambda_sums: Sequence[Mapping[str, torch.Tensor]],
    sequence_count: int, metadata: FactorMetadata, device: torch.device | str = "cpu",
) -> EkfacFactors:
    """Per module: the eigenbasis' four tensors and Λ = Σ_files lambda_sum (m, n) /
    ``sequence_count`` (divided on ``device``), written before the next module is read;
    returns the written factors, read lazily. Bit-identical to ``assemble_factors``."""
    if sequence_count == 0:
        raise ValueError("corrected-eigenvalue statistics hold no sequences")
    _same_modules(lambda_sums)
    plan = [e for spec in specs for e in _basis_plan(spec) + [(f"{spec.name}::lambda", torch.float64, (spec.d_out, spec.d_in))]]
    with StreamingTensorWriter(path, plan, factor_file_metadata(metadata, specs)) as out:
        for spec in specs:
            for key in BASIS_KEYS:
                out.write(f"{spec.name}::{key}", getattr(basis, key)[spec.name])
            out.write(f"{spec.name}::lambda", _module_sum(lambda_sums, spec.name).to(device) / sequence_count)
    return load_factors(path)


def finetune_examples(data: FinetuneData, loaded: LoadedModel) -> list[LMExample]:
    """The fine-tuned model's own training distribution, as engine examples."""
    tok = loaded.tokenizer
    rows = data.table.to_pylist()
    if data.kind == "prompt_completion":
        return [query_example(_ids(tok, r["prompt"]), _ids(tok, r["completion"])) for r in rows]
    if data.kind == "chat":
        return [_chat_example(loaded, data.source, r) for r in rows]
    if data.kind == "classification":
        label2id = getattr(loaded.model.config, "label2id", {}) or {}
        return [classification_example(_ids(tok, r["text"]), _label_index(r["label"], label2id)) for r in rows]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    from ..engine import document_example

    return [document_example(bos + _ids(tok, r["text"])) for r in rows]


def _chat_example(loaded: LoadedModel, source: str, row: dict) -> LMExample:
    """Loss on the final assistant turn; like prompt/completion rows, no ``<bos>`` is added
    (a template that wants one writes it)."""
    where = f"{source}:{row['source_line']}"
    if loaded.task != "causal_lm":
        raise InputError(f"{where}: messages — a sequence-classification fine-tune trains on labels — use {{'text','label'}} rows")
    chat = render_chat(loaded.tokenizer, json.loads(row["messages"]), where, "fine-tuning row", prepend_bos=False)
    return query_example(chat.prompt_ids, chat.completion_ids)


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


def _shard_files(stack: ExitStack, layout: LakeLayout, ids: ModelIds, shards: Sequence[str], kind: str) -> list[TensorFile]:
    if not shards:
        raise ValueError("no factor statistics to merge: is the factor set of shards empty?")
    return [stack.enter_context(TensorFile(layout.factor_stats_file("pt", ids.pt, f"{s}.{kind}"))) for s in shards]


def build_eigenbasis(layout: LakeLayout, ids: ModelIds, shards: Sequence[str], settings: ComputeSettings) -> tuple[Path, int, list[ModuleSpec]]:
    """Merge the factor set's covariances and eigendecompose them (float64, per head block), one
    module at a time. Returns the eigenbasis file, the token count and the module specs."""
    with ExitStack() as stack:
        files = _shard_files(stack, layout, ids, shards, "covariance")
        specs = specs_from_json(files[0].metadata["specs"])
        tokens = sum(int(f.metadata["token_count"]) for f in files)
        path = layout.factors_file("pt", ids.pt, "eigenbasis")
        write_eigenbasis(path, [f.view("a_sum") for f in files], [f.view("s_sum") for f in files], tokens, specs,
                         settings.split_heads, {"shards": ",".join(shards)})
    return path, tokens, specs


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
    """Eigenbasis + the factor set's mean corrected eigenvalues → the pre-trained factors,
    module by module; the token count from the covariance files' headers. Returns the file and
    its factors, read lazily."""
    args = settings.factor_args(pad_id=0)  # the metadata records labels, seed and dtypes, not the pad id
    with ExitStack() as stack:
        lambdas = _shard_files(stack, layout, ids, shards, "lambda")
        sequences = sum(int(f.metadata["sequence_count"]) for f in lambdas)
        tokens = sum(int(read_metadata(layout.factor_stats_file("pt", ids.pt, f"{s}.covariance"))["token_count"]) for s in shards)
        eigenbasis_file = layout.factors_file("pt", ids.pt, "eigenbasis")
        specs, basis = stored_specs(eigenbasis_file), load_eigenbasis(eigenbasis_file)
        meta = factor_metadata(specs, args, CovarianceStats({}, {}, tokens), LambdaStats({}, sequences), ids.pt, settings.scope)
        path = layout.factors_file("pt", ids.pt)
        factors = write_factors(path, specs, basis, [f.view("lambda_sum") for f in lambdas], sequences, meta)
    return path, factors


def fit_finetuned_step(layout: LakeLayout, pt_dir: Path, ft_dir: Path, data_file: Path, ids: ModelIds, settings: ComputeSettings) -> tuple[Path, EkfacFactors]:
    """EK-FAC factors of θ_ft on its own fine-tuning data sample, through files like the
    pre-trained set: covariance sums → ``stats/shard=covariance`` (then freed), eigenbasis per
    module → ``eigenbasis``, the Λ pass over the lazily read eigenbasis, factors per module.
    The covariance and eigenbasis files are scratch, removed once used (nothing reads them later).
    Peak: the larger of one pass's sums and Λ's sums plus one module (was cov + basis + Λ).
    Eigendecompositions and Λ's division run on the model's device, as in
    :func:`fit_finetuned_factors` (identical results). Returns the file and its lazy factors."""
    check_pair(pt_dir, ft_dir, settings)
    ft = load_finetuned(ft_dir, settings, base=pt_dir)
    specs = discover_modules(ft.model, settings.scope)
    examples = finetune_examples(read_finetune_file(data_file), ft)
    args, device = settings.factor_args(pad_id_of(ft)), model_device(ft.model)
    cov = fit_covariance(ft.model, specs, examples, args)
    cov_file, tokens = layout.factor_stats_file("ft", ids.ft, "covariance"), cov.token_count
    save_covariance(cov_file, cov, {"specs": specs_to_json(specs)})
    del cov
    eigenbasis_file = layout.factors_file("ft", ids.ft, "eigenbasis")
    with TensorFile(cov_file) as sums:
        write_eigenbasis(eigenbasis_file, [sums.view("a_sum")], [sums.view("s_sum")], tokens, specs, settings.split_heads, {}, device)
    cov_file.unlink()  # scratch: at 410M each of these is ~9 GB of disk
    basis = load_eigenbasis(eigenbasis_file)
    lam = fit_lambdas(ft.model, specs, basis, examples, args)
    meta = factor_metadata(specs, args, CovarianceStats({}, {}, tokens), lam, ids.ft, settings.scope)
    path = layout.factors_file("ft", ids.ft)
    factors = write_factors(path, specs, basis, [lam.sums], lam.sequence_count, meta, device)
    eigenbasis_file.unlink()  # the factors file holds the basis
    return path, factors
