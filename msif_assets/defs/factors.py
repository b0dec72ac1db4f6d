"""EK-FAC factors: pre-trained (map-reduced over corpus shards) and fine-tuned (fine-tuning data).

pt_covariance[shard] → pt_eigenbasis → pt_lambda[shard] → pt_factors. Shards outside the
configured factor set write an empty marker (constant data version): they never touch the
factors.
"""


import dagster as dg
import torch

from ..engine import discover_modules, fit_covariance, fit_lambdas
from ..lake import tables
from ..lake.inputs import read_finetune_file
from ..lake.models import fingerprint_model_dir
from ..pipeline.corpus import chunk_examples
from ..pipeline.factors import (
    factor_args, finetune_examples, fit_finetuned_factors, load_covariance, load_eigenbasis, load_lambda,
    merge_all, pad_id_of, save_covariance, save_eigenbasis, save_factors, save_lambda,
)
from ..pipeline.models import check_pair, load_finetuned, load_pretrained, short_hash
from ..engine.factors import assemble_factors
from ..engine.influence import factor_metadata
from .automation import HEAVY_POOL, refresh_on_change, safetensors_version
from .corpus import SHARDS, doc_chunks
from .inputs import finetune_data, finetuned_model, pretrained_model
from .resources import ComputeResource, InputsResource, LakeResource

GROUP = "factors"
EXCLUDED = dg.DataVersion("not-in-factor-set")


def _pt_hash(inputs: InputsResource) -> str:
    return short_hash(fingerprint_model_dir(inputs.path("pretrained_model")))


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[doc_chunks, pretrained_model], pool=HEAVY_POOL,
          automation_condition=refresh_on_change(), kinds={"pytorch", "safetensors"})
def pt_covariance(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Σ a aᵀ, Σ s sᵀ and token counts of one shard's chunks under θ_pt (sampled labels)."""
    settings, shard, layout = compute.settings(), context.partition_key, lake.layout()
    if not settings.in_factor_set(shard):
        return dg.MaterializeResult(metadata={"in_factor_set": False}, data_version=EXCLUDED)
    check_pair(inputs.path("pretrained_model"), inputs.path("finetuned_model"), settings)
    pt = load_pretrained(inputs.path("pretrained_model"), settings)
    specs = discover_modules(pt.model, settings.scope)
    examples = chunk_examples(tables.read_chunks(layout, shard), pt.tokenizer.bos_token_id)
    stats = fit_covariance(pt.model, specs, examples, factor_args(settings, pad_id_of(pt), _shard_seed(shard)))
    path = layout.factor_stats_file("pt", _pt_hash(inputs), f"{shard}.covariance")
    save_covariance(path, stats, {"shard": shard})
    return dg.MaterializeResult(metadata={"in_factor_set": True, "tokens": stats.token_count, "sequences": len(examples)}, data_version=safetensors_version(path))


def _shard_seed(shard: str) -> int:
    """Independent label draws per shard, reproducible from the shard's name."""
    import zlib

    return zlib.crc32(shard.encode()) % 100_000


def _factor_set(context: dg.AssetExecutionContext, settings) -> list[str]:
    shards = context.instance.get_dynamic_partitions(SHARDS.name)
    chosen = [s for s in shards if settings.in_factor_set(s)]
    if not chosen:
        raise ValueError(f"no corpus shard is in the factor set {list(settings.factor_shards)}; shards present: {shards}")
    return chosen


@dg.asset(group_name=GROUP, deps=[pt_covariance], pool=HEAVY_POOL, automation_condition=refresh_on_change(), kinds={"safetensors"})
def pt_eigenbasis(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Merged covariances → float64 eigendecompositions (per head block for q/k/v when split)."""
    settings, layout, pt_hash = compute.settings(), lake.layout(), _pt_hash(inputs)
    shards = _factor_set(context, settings)
    stats = merge_all([load_covariance(layout.factor_stats_file("pt", pt_hash, f"{s}.covariance")) for s in shards])
    pt = load_pretrained(inputs.path("pretrained_model"), settings)
    specs = discover_modules(pt.model, settings.scope)
    path = layout.factors_file("pt", pt_hash, "eigenbasis")
    save_eigenbasis(path, stats, specs, settings, {"shards": ",".join(shards)})
    return dg.MaterializeResult(metadata={"shards": len(shards), "tokens": stats.token_count, "modules": len(specs)}, data_version=safetensors_version(path))


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[pt_eigenbasis, doc_chunks], pool=HEAVY_POOL,
          automation_condition=refresh_on_change(), kinds={"pytorch", "safetensors"})
def pt_lambda(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Σ (Q_Sᵀ DW Q_A)^∘2 over one shard's chunks: the corrected eigenvalues' sums."""
    settings, shard, layout = compute.settings(), context.partition_key, lake.layout()
    if not settings.in_factor_set(shard):
        return dg.MaterializeResult(metadata={"in_factor_set": False}, data_version=EXCLUDED)
    pt_hash = _pt_hash(inputs)
    pt = load_pretrained(inputs.path("pretrained_model"), settings)
    specs = discover_modules(pt.model, settings.scope)
    basis = load_eigenbasis(layout.factors_file("pt", pt_hash, "eigenbasis"))
    examples = chunk_examples(tables.read_chunks(layout, shard), pt.tokenizer.bos_token_id)
    stats = fit_lambdas(pt.model, specs, basis, examples, factor_args(settings, pad_id_of(pt), _shard_seed(shard)))
    path = layout.factor_stats_file("pt", pt_hash, f"{shard}.lambda")
    save_lambda(path, stats, {"shard": shard})
    return dg.MaterializeResult(metadata={"in_factor_set": True, "sequences": stats.sequence_count}, data_version=safetensors_version(path))


@dg.asset(group_name=GROUP, deps=[pt_lambda, pt_eigenbasis], pool=HEAVY_POOL, automation_condition=refresh_on_change(), kinds={"safetensors"})
def pt_factors(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """EK-FAC factors of θ_pt on the corpus: eigenbasis + mean corrected eigenvalues + metadata."""
    settings, layout, pt_hash = compute.settings(), lake.layout(), _pt_hash(inputs)
    shards = _factor_set(context, settings)
    lam = merge_all([load_lambda(layout.factor_stats_file("pt", pt_hash, f"{s}.lambda")) for s in shards])
    cov = merge_all([load_covariance(layout.factor_stats_file("pt", pt_hash, f"{s}.covariance")) for s in shards])
    basis = load_eigenbasis(layout.factors_file("pt", pt_hash, "eigenbasis"))
    pt = load_pretrained(inputs.path("pretrained_model"), settings)
    specs = discover_modules(pt.model, settings.scope)
    args = factor_args(settings, pad_id_of(pt))
    factors = assemble_factors(specs, basis, lam, factor_metadata(specs, args, cov, lam, pt_hash, settings.scope))
    path = layout.factors_file("pt", pt_hash)
    save_factors(path, factors)
    return dg.MaterializeResult(metadata=_factor_metadata(factors), data_version=safetensors_version(path))


@dg.asset(group_name=GROUP, deps=[finetuned_model, finetune_data], pool=HEAVY_POOL, automation_condition=refresh_on_change(), kinds={"pytorch", "safetensors"})
def ft_factors(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """EK-FAC factors of θ_ft on its own fine-tuning data sample."""
    settings, layout = compute.settings(), lake.layout()
    ft_hash = short_hash(fingerprint_model_dir(inputs.path("finetuned_model")))
    check_pair(inputs.path("pretrained_model"), inputs.path("finetuned_model"), settings)
    ft = load_finetuned(inputs.path("finetuned_model"), settings)
    specs = discover_modules(ft.model, settings.scope)
    examples = finetune_examples(read_finetune_file(inputs.path("finetune_data")), ft)
    factors = fit_finetuned_factors(ft, specs, examples, settings, ft_hash)
    path = layout.factors_file("ft", ft_hash)
    save_factors(path, factors)
    return dg.MaterializeResult(metadata=_factor_metadata(factors), data_version=safetensors_version(path))


def _factor_metadata(factors) -> dict:
    m = factors.metadata
    smallest = min(float(v.min()) for v in factors.lambdas.values())
    return {
        "model": m.model_fingerprint, "modules": len(m.modules), "tokens": m.token_count, "sequences": m.sequence_count,
        "labels": m.labels, "split_heads": m.split_heads, "scope": m.scope, "min_lambda": smallest,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
