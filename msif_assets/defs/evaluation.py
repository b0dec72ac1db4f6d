"""The paper's analyses as assets: fact tracing over the influence table, EK-FAC fidelity on a
small trained model, parameter proximity of the two models, and the MLP/attention share.

Each writes ``eval/<name>.parquet`` tables (schemas: ``pipeline/evaluation.py``), reports a
content data version (timings and timestamps excluded) and shows its result in metadata.
"""


import hashlib
import json
from dataclasses import asdict

import dagster as dg
import pyarrow as pa

from ..lake import tables
from ..pipeline import evaluation as ev
from ..pipeline import fidelity_eval as fe
from ..pipeline import model_analysis as ma
from ..pipeline.models import check_pair, load_pair
from ..pipeline.settings import ScoreKey
from .automation import refresh_on_change, table_version, text_version
from .inputs import finetuned_model, pretrained_model
from .queries import queries
from .resources import ComputeResource, InputsResource, LakeResource
from .scores import influence_scores

GROUP = "evaluation"
VOLATILE = ("computed_at", "seconds")


def _version(*tables_: pa.Table) -> dg.DataVersion:
    return text_version(*(table_version(t, ignore=VOLATILE).value for t in tables_))


@dg.asset(group_name=GROUP, deps=[influence_scores, queries], automation_condition=refresh_on_change(), kinds={"duckdb", "parquet"})
def fact_tracing_eval(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource) -> dg.MaterializeResult:
    """MRR and Recall@10 (any / fraction) of every method and damping for gold-labelled queries,
    ranking all scored documents (``full``) and Akyürek et al.'s rerank pools (``rerank``)."""
    layout, ids = lake.layout(), inputs.model_ids
    query_table = tables.read_queries(layout)
    labelled = ev.gold_queries(query_table)
    png = layout.eval_dir / "fact_tracing.png"
    if not labelled:  # clear earlier results, so no stale evaluation outlives its labels
        ev.write_fact_tracing(layout, ev.FactTracing.empty())
        png.unlink(missing_ok=True)
        context.log.info("no query has gold_doc_ids: fact tracing skipped")
        return dg.MaterializeResult(metadata={"skipped": "no query has gold_doc_ids", "queries_with_gold": 0},
                                    data_version=text_version("no-gold-labels"))
    doc_scores = ev.document_scores(ev.load_chunk_scores(layout, ids))
    result = ev.fact_tracing(doc_scores, query_table, ev.load_doc_texts(layout), ids.ft)
    ev.write_fact_tracing(layout, result)
    ev.plot_fact_tracing(result.summary, png)
    pools = result.pools.to_pylist()
    return dg.MaterializeResult(
        metadata={
            "queries_with_gold": len(labelled), "ft_model": ids.ft, "pt_model": ids.pt,
            "mean_rerank_pool": sum(p["n_pool"] for p in pools) / len(pools),
            "mean_eligible_docs": sum(p["n_eligible"] for p in pools) / len(pools),
            "summary": dg.MetadataValue.md(ev.summary_markdown(result.summary)),
            "plot": dg.MetadataValue.md(ev.png_markdown(png)), "plot_path": dg.MetadataValue.path(str(png)),
            "sql": "SELECT * FROM fact_tracing ORDER BY protocol, method, damping_kind, damping",
        },
        data_version=_version(*result.rankings.values(), result.summary, result.pools),
    )


def build_ekfac_fidelity(config: fe.FidelityConfig = fe.FidelityConfig()) -> dg.AssetsDefinition:
    """The fidelity asset for one :class:`FidelityConfig` (its hash is the code version, so a
    new config re-runs it under automation)."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:12]

    @dg.asset(name="ekfac_fidelity", group_name=GROUP, code_version=f"fidelity-{digest}", automation_condition=refresh_on_change(),
              kinds={"pytorch", "parquet"})
    def ekfac_fidelity(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
        """Spearman/Pearson of EK-FAC (split/unsplit heads, MLP only), GDP and the exact GGN's
        per-module blocks (the ceiling of per-module methods) against exact damped-GGN
        influence on a tiny GPT-NeoX trained on a synthetic Markov chain (Table 1)."""
        result = fe.run_fidelity(config)
        table = fe.fidelity_rows(result)
        tables.write_eval(lake.layout(), "eval_fidelity", table)
        rows = table.to_pylist()
        return dg.MaterializeResult(
            metadata={"model": result.config.model_label, "final_train_loss": result.final_loss, "pairs": result.n_pairs,
                      "train_seconds": result.train_seconds,
                      "table": dg.MetadataValue.md(ma.markdown_table(rows, ["method", "damping", "spearman", "pearson", "seconds"]))},
            data_version=_version(table),
        )

    return ekfac_fidelity


ekfac_fidelity = build_ekfac_fidelity(fe.fidelity_config_from_env())  # MSIF_FIDELITY=small: a few seconds


@dg.asset(group_name=GROUP, deps=[pretrained_model, finetuned_model], automation_condition=refresh_on_change(),
          kinds={"pytorch", "parquet"})
def param_proximity(lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """‖θ_ft − θ_pt‖₂ / ‖θ_pt‖₂ over the tracked weights (all, MLP, attention) and over all
    parameters the two models share (paper: at most a few percent)."""
    ids = inputs.model_ids
    pair = load_pair(inputs.path("pretrained_model"), inputs.path("finetuned_model"), ids, compute.settings)
    rows = [{**asdict(r), "pt_model": ids.pt, "ft_model": ids.ft, "computed_at": ev.now_utc()}
            for r in ma.parameter_proximity(pair.pt.model, pair.ft.model, pair.specs)]
    table = pa.Table.from_pylist(rows, schema=tables.PARAM_PROXIMITY.schema)
    tables.write_eval(lake.layout(), "param_proximity", table)
    cols = ["scope", "n_tensors", "n_params", "relative_distance"]
    return dg.MaterializeResult(
        metadata={"tracked": rows[0]["relative_distance"], "table": dg.MetadataValue.md(ma.markdown_table(rows, cols))},
        data_version=_version(table),
    )


@dg.asset(group_name=GROUP, deps=[influence_scores], automation_condition=refresh_on_change(), kinds={"duckdb", "parquet"})
def influence_share(lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Share of |influence| through MLP vs attention modules per method and damping, next to
    their share of tracked parameters (paper: attention ≈ 25% of parameters, ≈ 14.5% of influence)."""
    layout, ids = lake.layout(), inputs.model_ids
    specs = check_pair(inputs.path("pretrained_model"), inputs.path("finetuned_model"), compute.settings)  # no weights read
    counts = ma.tracked_parameter_counts(specs)
    now = ev.now_utc()
    rows = [{**r, "pt_model": ids.pt, "ft_model": ids.ft, "computed_at": now}
            for r in ma.influence_shares(ev.load_chunk_scores(layout, ids), counts)]
    table = pa.Table.from_pylist(rows, schema=tables.INFLUENCE_SHARE.schema)
    tables.write_eval(layout, "influence_share", table)
    cols = ["method", "damping", "influence_share_mlp", "influence_share_attn", "param_share_mlp", "param_share_attn"]
    shown = [{**r, "damping": ScoreKey.from_columns(r["method"], r["damping_kind"], r["damping"]).damping_label} for r in rows]
    return dg.MaterializeResult(
        metadata={"param_count_mlp": counts["mlp"], "param_count_attn": counts["attn"],
                  "table": dg.MetadataValue.md(ma.markdown_table(shown, cols))},
        data_version=_version(table),
    )


EVAL_ASSETS = [fact_tracing_eval, ekfac_fidelity, param_proximity, influence_share]
