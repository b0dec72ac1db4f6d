"""Queries (with generated completions where missing), preconditioned query gradients, and
candidate chunks per query and shard."""


import dagster as dg

from ..lake import tables
from ..lake.embeddings import load_sentence_encoder
from ..pipeline.factors import load_factors
from ..pipeline.models import load_finetuned, load_pair
from ..pipeline.queries import load_queries, select_candidates, write_query_gradients
from .automation import HEAVY_POOL, refresh_on_change, safetensors_version, table_version
from .corpus import SHARDS, doc_chunks, doc_embeddings
from .executors import HEAVY_OP_TAGS
from .factors import ft_factors, pt_factors
from .inputs import finetuned_model, queries_file
from .resources import ComputeResource, InputsResource, LakeResource

GROUP = "queries"


@dg.asset(group_name=GROUP, deps=[queries_file, finetuned_model], automation_condition=refresh_on_change(), kinds={"parquet"})
def queries(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """The queries table; a missing completion is the fine-tuned model's greedy answer."""
    settings = compute.settings
    ft = load_finetuned(inputs.path("finetuned_model"), settings, base=inputs.path("pretrained_model"))
    table = load_queries(inputs.path("queries"), ft, settings)
    tables.write_queries(lake.layout(), table)
    generated = sum('"generated"' in m for m in table.column("meta").to_pylist())
    preview = "\n".join(f"- `{r['query_id']}` {r['prompt']} → **{r['completion']}**" for r in table.slice(0, 10).to_pylist())
    return dg.MaterializeResult(
        metadata={"queries": table.num_rows, "generated_completions": generated, "preview": dg.MetadataValue.md(preview)},
        data_version=table_version(table, ignore=("source_file",)),
    )


@dg.asset(group_name=GROUP, deps=[queries, pt_factors, ft_factors], pool=HEAVY_POOL, op_tags=HEAVY_OP_TAGS,
          automation_condition=refresh_on_change(), kinds={"pytorch", "safetensors"})
def query_gradients(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """∇f(q; θ_ft) preconditioned per method and damping: P_pt P_ft ∇f (MS-IF), P_ft ∇f (SS-IF), ∇f (GDP)."""
    settings, layout, ids = compute.settings, lake.layout(), inputs.model_ids
    pair = load_pair(inputs.path("pretrained_model"), inputs.path("finetuned_model"), ids, settings)
    table = tables.read_queries(layout)
    pt_f, ft_f = load_factors(layout.factors_file("pt", ids.pt)), load_factors(layout.factors_file("ft", ids.ft))
    paths = write_query_gradients(layout, pair.ft, pair.specs, table, pt_f, ft_f, ids, settings)
    return dg.MaterializeResult(
        metadata={"queries": table.num_rows, "vectors": ", ".join(k.label for k in settings.gradient_keys), "modules": len(pair.specs),
                  "files": len(paths), "query_rank": settings.query_rank or "full"},
        data_version=safetensors_version(*paths),
    )


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[queries, doc_embeddings, doc_chunks], automation_condition=refresh_on_change(), kinds={"lancedb", "parquet"})
def candidates(context: dg.AssetExecutionContext, lake: LakeResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Per query, this shard's chunks worth a backward pass: KNN in LanceDB (∪ BM25), or all."""
    settings, layout, shard = compute.settings, lake.layout(), context.partition_key
    encoder = load_sentence_encoder(settings.embedding_model_dir or None, str(settings.torch_device))
    table = select_candidates(layout, shard, tables.read_queries(layout), encoder, settings)
    tables.write_candidates(layout, shard, table)
    return dg.MaterializeResult(
        metadata={"pairs": table.num_rows, "chunks": len(set(table.column("chunk_id").to_pylist()))},
        data_version=table_version(table),
    )
