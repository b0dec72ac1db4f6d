"""Influence scores per shard: hive-partitioned Parquet, one row per (query, chunk, method, damping)."""


import dagster as dg

from ..lake import tables
from ..pipeline.models import load_pair
from ..pipeline.scoring import score_shard
from ..pipeline.settings import ALL_METHODS
from .automation import HEAVY_POOL, refresh_on_change, table_version
from .corpus import SHARDS, doc_chunks
from .queries import candidates, queries, query_gradients
from .resources import ComputeResource, InputsResource, LakeResource

GROUP = "influence"


@dg.asset(partitions_def=SHARDS, group_name=GROUP, pool=HEAVY_POOL,
          deps=[query_gradients, candidates, doc_chunks, queries],
          automation_condition=refresh_on_change(), kinds={"pytorch", "parquet"})
def influence_scores(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """MS-IF, SS-IF, GDP, RepSim and BM25 scores of this shard's candidates for every query."""
    settings, layout, shard, ids = compute.settings, lake.layout(), context.partition_key, inputs.model_ids
    pair = load_pair(inputs.path("pretrained_model"), inputs.path("finetuned_model"), ids, settings)
    table = score_shard(layout, shard, pair, tables.read_queries(layout), settings)
    tables.write_scores(layout, ids.ft, shard, table)
    return dg.MaterializeResult(
        metadata={"rows": table.num_rows, "ft_model": ids.ft, "pt_model": ids.pt, "top": dg.MetadataValue.md(_preview(table))},
        data_version=table_version(table, ignore=("computed_at",)),
    )


def _preview(table, per_query: int = 3) -> str:
    """Markdown: the top chunks per query under the first influence method present."""
    methods = [m for m in ALL_METHODS if m in set(table.column("method").to_pylist())]
    if not methods:
        return "(no scores)"
    rows = [r for r in table.to_pylist() if r["method"] == methods[0] and r["rank"] <= per_query]
    lines = [f"Top {per_query} per query by **{methods[0]}** (this shard):", ""]
    lines += [f"- `{r['query_id']}` #{r['rank']} `{r['doc_id']}` ({r['score']:.3g})" for r in sorted(rows, key=lambda r: (r["query_id"], r["rank"]))[:60]]
    return "\n".join(lines)
