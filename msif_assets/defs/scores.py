"""Influence scores per shard: hive-partitioned Parquet, one row per (query, chunk, method, damping)."""


import dagster as dg

from ..lake import tables
from ..pipeline.models import load_pair
from ..pipeline.scoring import score_shard
from ..pipeline.settings import ALL_METHODS, ScoreKey
from .automation import HEAVY_POOL, refresh_on_change, table_version
from .corpus import SHARDS, doc_chunks
from .executors import HEAVY_OP_TAGS
from .queries import candidates, queries, query_gradients
from .resources import ComputeResource, InputsResource, LakeResource

GROUP = "influence"


@dg.asset(partitions_def=SHARDS, group_name=GROUP, pool=HEAVY_POOL, op_tags=HEAVY_OP_TAGS,
          deps=[query_gradients, candidates, doc_chunks, queries],
          automation_condition=refresh_on_change(), kinds={"pytorch", "parquet"})
def influence_scores(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """MS-IF, SS-IF, GDP, RepSim and BM25 scores of this shard's candidates for every query."""
    settings, layout, shard, ids = compute.settings, lake.layout(), context.partition_key, inputs.model_ids
    pair = load_pair(inputs.path("pretrained_model"), inputs.path("finetuned_model"), ids, settings)
    table = score_shard(layout, shard, pair, tables.read_queries(layout), settings)
    tables.write_scores(layout, ids.ft, shard, table)
    return dg.MaterializeResult(
        metadata={"rows": table.num_rows, "ft_model": ids.ft, "pt_model": ids.pt, "top": dg.MetadataValue.md(preview(table, _chunk_texts(layout, shard)))},
        data_version=table_version(table, ignore=("computed_at",)),
    )


def _chunk_texts(layout, shard: str) -> dict[str, str]:
    chunks = tables.read_chunks(layout, shard)
    return dict(zip(chunks.column("chunk_id").to_pylist(), chunks.column("text").to_pylist()))


def _snippet(text: str | None, width: int = 80) -> str:
    """One line of at most ``width`` characters, safe inside a Markdown table cell."""
    flat = " ".join((text or "").split())
    flat = flat if len(flat) <= width else flat[: width - 1].rstrip() + "…"
    return flat.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")


def headline_key(keys) -> ScoreKey:
    """The score group a preview shows: the first method in configuration order (ms-if first),
    at its smallest relative damping, else its smallest absolute one (as ``msif top`` does)."""
    return min(keys, key=lambda k: (ALL_METHODS.index(k.method), k.damping is not None and k.damping.mode != "relative",
                                    k.damping.value if k.damping else 0.0))


def preview(table, chunk_texts: dict[str, str], per_query: int = 3, max_queries: int = 20) -> str:
    """Markdown: per query, the top chunks of this shard under one score group, each row with
    its method, damping, rank, document id, score and a snippet of the chunk's text; then the
    other score groups the shard holds (every method@damping is one ranking)."""
    rows = table.to_pylist()
    groups: dict[ScoreKey, list[dict]] = {}
    for r in rows:
        groups.setdefault(ScoreKey.from_columns(r["method"], r["damping_kind"], r["damping"]), []).append(r)
    if not groups:
        return "(no scores)"
    key = headline_key(groups)
    top = sorted((r for r in groups[key] if r["rank"] <= per_query), key=lambda r: (r["query_id"], r["rank"]))
    query_ids = sorted({r["query_id"] for r in top})
    shown = set(query_ids[:max_queries])
    lines = [f"Top {per_query} chunks per query in this shard by **{key.label}**:", "",
             "| query | method | damping | rank | doc_id | score | text |", "|---|---|---|---:|---|---:|---|"]
    lines += [f"| `{r['query_id']}` | {key.method} | {key.damping_label} | {r['rank']} | `{r['doc_id']}` | {r['score']:.3g} | "
              f"{_snippet(chunk_texts.get(r['chunk_id']))} |" for r in top if r["query_id"] in shown]
    if len(query_ids) > max_queries:
        lines += ["", f"… and {len(query_ids) - max_queries} more queries."]
    others = [k.label for k in sorted(groups, key=lambda k: k.order) if k != key]
    if others:
        lines += ["", f"Other score groups in this shard: {', '.join(others)}. All of them, with text: "
                      "`SELECT * FROM top_k` or `msif top <query_id> --all`."]
    return "\n".join(lines)
