"""EK-FAC factors: pre-trained (map-reduced over corpus shards) and fine-tuned (fine-tuning data).

pt_covariance[shard] → pt_eigenbasis → pt_lambda[shard] → pt_factors. Shards outside the
configured factor set write an empty marker (constant data version): they never touch the
factors.
"""


import dagster as dg
import torch

from ..pipeline import factors as pf
from .automation import HEAVY_POOL, refresh_on_change, safetensors_version
from .corpus import SHARDS, doc_chunks
from .executors import HEAVY_OP_TAGS
from .inputs import finetune_data, finetuned_model, pretrained_model
from .resources import ComputeResource, InputsResource, LakeResource

GROUP = "factors"
EXCLUDED = dg.DataVersion("not-in-factor-set")
KINDS = {"pytorch", "safetensors"}


def _excluded() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"in_factor_set": False}, data_version=EXCLUDED)


def _factor_set(context: dg.AssetExecutionContext, compute: ComputeResource) -> list[str]:
    shards = context.instance.get_dynamic_partitions(SHARDS.name)
    chosen = [s for s in shards if compute.settings.in_factor_set(s)]
    if not chosen:
        raise ValueError(f"no corpus shard is in the factor set {list(compute.settings.factor_shards)}; shards present: {shards}")
    return chosen


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[doc_chunks, pretrained_model], pool=HEAVY_POOL, op_tags=HEAVY_OP_TAGS,
          automation_condition=refresh_on_change(), kinds=KINDS)
def pt_covariance(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Σ a aᵀ, Σ s sᵀ and token counts of one shard's chunks under θ_pt (sampled labels)."""
    if not compute.settings.in_factor_set(context.partition_key):
        return _excluded()
    fit = pf.fit_shard_covariance(lake.layout(), inputs.path("pretrained_model"), inputs.path("finetuned_model"),
                                  inputs.model_ids, context.partition_key, compute.settings)
    return dg.MaterializeResult(metadata={"in_factor_set": True, "tokens": fit.tokens, "sequences": fit.sequences},
                                data_version=safetensors_version(fit.path))


@dg.asset(group_name=GROUP, deps=[pt_covariance], pool=HEAVY_POOL, op_tags=HEAVY_OP_TAGS, automation_condition=refresh_on_change(), kinds={"safetensors"})
def pt_eigenbasis(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Merged covariances → float64 eigendecompositions (per head block for q/k/v when split)."""
    shards = _factor_set(context, compute)
    path, tokens, specs = pf.build_eigenbasis(lake.layout(), inputs.model_ids, shards, compute.settings)
    return dg.MaterializeResult(metadata={"shards": len(shards), "tokens": tokens, "modules": len(specs)},
                                data_version=safetensors_version(path))


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[pt_eigenbasis, doc_chunks], pool=HEAVY_POOL, op_tags=HEAVY_OP_TAGS,
          automation_condition=refresh_on_change(), kinds=KINDS)
def pt_lambda(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Σ (Q_Sᵀ DW Q_A)^∘2 over one shard's chunks: the corrected eigenvalues' sums."""
    if not compute.settings.in_factor_set(context.partition_key):
        return _excluded()
    fit = pf.fit_shard_lambda(lake.layout(), inputs.path("pretrained_model"), inputs.model_ids, context.partition_key, compute.settings)
    return dg.MaterializeResult(metadata={"in_factor_set": True, "sequences": fit.sequences}, data_version=safetensors_version(fit.path))


@dg.asset(group_name=GROUP, deps=[pt_lambda, pt_eigenbasis], pool=HEAVY_POOL, op_tags=HEAVY_OP_TAGS, automation_condition=refresh_on_change(), kinds={"safetensors"})
def pt_factors(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """EK-FAC factors of θ_pt on the corpus: eigenbasis + mean corrected eigenvalues + metadata."""
    path, factors = pf.assemble_pretrained_factors(lake.layout(), inputs.model_ids, _factor_set(context, compute), compute.settings)
    return dg.MaterializeResult(metadata=_factor_metadata(factors), data_version=safetensors_version(path))


@dg.asset(group_name=GROUP, deps=[finetuned_model, finetune_data], pool=HEAVY_POOL, op_tags=HEAVY_OP_TAGS, automation_condition=refresh_on_change(), kinds=KINDS)
def ft_factors(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """EK-FAC factors of θ_ft on its own fine-tuning data sample."""
    path, factors = pf.fit_finetuned_step(lake.layout(), inputs.path("pretrained_model"), inputs.path("finetuned_model"),
                                          inputs.path("finetune_data"), inputs.model_ids, compute.settings)
    return dg.MaterializeResult(metadata=_factor_metadata(factors), data_version=safetensors_version(path))


def _factor_metadata(factors) -> dict:
    m = factors.metadata
    smallest = min(float(v.min()) for v in factors.lambdas.values())
    return {
        "model": m.model_fingerprint, "modules": len(m.modules), "tokens": m.token_count, "sequences": m.sequence_count,
        "labels": m.labels, "split_heads": m.split_heads, "scope": m.scope, "min_lambda": smallest,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
