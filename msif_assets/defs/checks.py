"""Asset checks: factors are sane, embeddings match chunks, scores are finite and unique."""



import dagster as dg
import torch

from ..lake import tables
from ..lake.vectors import ChunkVectorStore
from ..pipeline.factors import load_factors
from .corpus import SHARDS, doc_embeddings
from .factors import ft_factors, pt_factors
from .resources import InputsResource, LakeResource
from .scores import influence_scores


def _factor_problems(path) -> list[str]:
    factors = load_factors(path)
    problems = []
    b = factors.eigenbasis
    for name in factors.names:
        for label, tensor in (("q_a", b.q_a[name]), ("q_s", b.q_s[name]), ("lambda", factors.lambdas[name])):
            if not torch.isfinite(tensor).all():
                problems.append(f"{name}.{label} has non-finite values")
        for label, tensor in (("eig_a", b.eig_a[name]), ("eig_s", b.eig_s[name])):
            # eigenvalues of a PSD matrix. Its sums accumulate float32 products, so a
            # rank-deficient covariance has null eigenvalues scattered around 0 at ~1e-8 of the
            # largest; anything below -1e-6 of it is a real defect.
            floor = -1e-6 * float(tensor.abs().max())
            if float(tensor.min()) < floor:
                problems.append(f"{name}.{label} min {float(tensor.min()):.3g} < 0")
        if float(factors.lambdas[name].min()) < 0:
            problems.append(f"{name}.lambda has negative entries")
    return problems


@dg.asset_check(asset=pt_factors, description="Every factor is finite; eigenvalues and Λ are ≥ 0.")
def pt_factors_sane(lake: LakeResource, inputs: InputsResource) -> dg.AssetCheckResult:
    problems = _factor_problems(lake.layout().factors_file("pt", inputs.model_ids.pt))
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": "\n".join(problems) or "none"})


@dg.asset_check(asset=ft_factors, description="Every factor is finite; eigenvalues and Λ are ≥ 0.")
def ft_factors_sane(lake: LakeResource, inputs: InputsResource) -> dg.AssetCheckResult:
    problems = _factor_problems(lake.layout().factors_file("ft", inputs.model_ids.ft))
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": "\n".join(problems) or "none"})


@dg.asset_check(asset=doc_embeddings, description="One vector per chunk, of the encoder's dimension.")
def embeddings_match_chunks(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    layout = lake.layout()
    store = ChunkVectorStore(layout.embeddings_dir)
    shards = context.instance.get_dynamic_partitions(SHARDS.name)
    mismatched = {}
    for shard in shards:
        if not layout.chunks_file(shard).exists():
            continue
        expected, stored = tables.read_chunks(layout, shard).num_rows, store.count(shard)
        if expected != stored:
            mismatched[shard] = f"{stored} vectors for {expected} chunks"
    dimension = store.dimension()
    return dg.AssetCheckResult(
        passed=not mismatched and (dimension or 0) > 0,
        metadata={"dimension": dimension or 0, "mismatched_shards": str(mismatched or "none")},
    )


@dg.asset_check(asset=influence_scores, blocking=True,
                description="Scores finite; exactly one row per (query, chunk, method, damping). Blocking: a failure "
                            "stops the assets downstream of the scores from materializing.")
def scores_finite_and_unique(context: dg.AssetCheckExecutionContext, lake: LakeResource, inputs: InputsResource) -> dg.AssetCheckResult:
    from ..lake.catalog import Catalog

    ft_hash = inputs.model_ids.ft
    catalog = Catalog.open(lake.layout().root, timeout_s=0)  # a check, not a user query: no time budget
    try:
        stats = catalog.query(
            "SELECT count(*) AS n, count(*) FILTER (WHERE NOT isfinite(score) OR NOT coalesce(isfinite(score_mlp), true) "
            "OR NOT coalesce(isfinite(score_attn), true)) AS nonfinite, "
            "count(*) - count(DISTINCT (query_id, chunk_id, shard, method, damping_kind, damping, pt_model)) AS duplicates "
            "FROM influence WHERE ft_model = $ft", {"ft": ft_hash}
        ).to_pylist()[0]
    finally:
        catalog.close()
    return dg.AssetCheckResult(passed=stats["n"] > 0 and stats["nonfinite"] == 0 and stats["duplicates"] == 0, metadata=stats)


CHECKS = [pt_factors_sane, ft_factors_sane, embeddings_match_chunks, scores_finite_and_unique]
