"""Assemble the Definitions from a config: the lineage, checks, sensors, schedule, resources,
plus — when the user brings nothing — the default world's producers and evaluations."""


import hashlib
import json

import dagster as dg
from dagster._core.definitions.external_asset import create_external_asset_from_source_asset

from .checks import CHECKS
from ..config import COLUMN_FIELDS, MsifConfig
from ..lake.inputs import CorpusColumns
from .corpus import corpus_shards, doc_chunks, doc_embeddings, inbox_files
from .factors import ft_factors, pt_covariance, pt_eigenbasis, pt_factors, pt_lambda
from .inputs import SOURCES
from .queries import candidates, queries, query_gradients
from ..pipeline.settings import ComputeSettings
from .resources import ComputeResource, InputsResource, LakeResource
from .evaluation import EVAL_ASSETS, ekfac_fidelity
from .executors import configured_executor
from .jobs import build_refresh_all_job
from .progress import install_progress_labels
from .scores import influence_scores
from .sensors import SCHEDULES, SENSORS, observe_inputs_job

LINEAGE = [
    corpus_shards, doc_chunks, doc_embeddings, pt_covariance, pt_eigenbasis, pt_lambda, pt_factors, ft_factors,
    queries, query_gradients, candidates, influence_scores,
]


# Settings each asset reads: a change to any of them is a new code version, so automation
# recomputes that asset (and, through data versions, only what its new output touches).
SETTINGS_READ: dict[str, tuple[str, ...]] = {
    "corpus_shards": ("text_column", "id_column"),
    "doc_chunks": ("max_chunk_tokens", "trust_remote_code"),
    "doc_embeddings": ("embedding_model_dir",),
    "pt_covariance": ("labels", "stats_dtype", "seed", "split_heads", "scope", "factor_shards", "dtype"),
    "pt_eigenbasis": ("split_heads", "scope", "factor_shards"),
    "pt_lambda": ("labels", "stats_dtype", "seed", "split_heads", "scope", "factor_shards", "dtype"),
    "pt_factors": ("factor_shards",),
    "ft_factors": ("labels", "stats_dtype", "seed", "split_heads", "scope", "dtype"),
    "queries": ("max_new_tokens",),
    "query_gradients": ("methods", "dampings", "scope", "dtype", "query_rank", "query_inner_rank", "query_batch_size"),
    "candidates": ("knn_k", "bm25_k", "all_chunks_below", "embedding_model_dir"),
    "influence_scores": ("methods", "dampings", "scope", "dtype"),
    "param_proximity": ("scope", "dtype", "trust_remote_code"),
    "influence_share": ("scope", "trust_remote_code"),
}
CODE_REVISION = "1"  # bump when an asset's computation changes meaning
# Per-asset revisions on top of CODE_REVISION: query_gradients 2 = its blocks are published by a
# marker (pipeline/query_store.py), so lakes written before are rewritten once, not read unmarked.
ASSET_REVISIONS: dict[str, str] = {"query_gradients": "2"}


def _with_config_versions(asset_def: dg.AssetsDefinition, settings: ComputeSettings, columns: CorpusColumns) -> dg.AssetsDefinition:
    fields = settings.to_config()
    if columns != CorpusColumns():  # default columns keep the code versions lakes were built with (no re-ingest)
        fields.update(columns.to_config())

    def version(spec: dg.AssetSpec) -> dg.AssetSpec:
        read = SETTINGS_READ.get(spec.key.to_user_string(), ())
        payload = json.dumps({k: fields[k] for k in read if k in fields or k not in COLUMN_FIELDS}, sort_keys=True)
        revision = ASSET_REVISIONS.get(spec.key.to_user_string(), CODE_REVISION)
        return spec.replace_attributes(code_version=f"{revision}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}")

    return asset_def.map_asset_specs(version)


def produced_by(producer: dg.AssetKey, observed) -> dg.AssetsDefinition:
    """An observed input (a source asset or ``inbox_files``) with ``producer`` upstream of it:
    the producer writes the files the input observes, so the lineage graph has that edge.
    Observing never runs the producer (an external asset's dependency is an edge, not a trigger)."""
    if isinstance(observed, dg.SourceAsset):
        observed = create_external_asset_from_source_asset(observed)
    return observed.map_asset_specs(
        lambda spec: spec.replace_attributes(deps=[*spec.deps, *([] if producer in {d.asset_key for d in spec.deps} else [producer])])
    )


def build_resources(config: MsifConfig) -> dict:
    return {
        "lake": LakeResource(root=config.lake_root),
        "inputs": InputsResource(**config.resolved_inputs(), **config.columns.to_config()),
        "compute": ComputeResource.from_settings(config.compute),
    }


def build_definitions(config: MsifConfig, counterfactual=None, executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """``counterfactual`` (CounterfactualArgs): add the counterfactual evaluation's assets (``msif
    validate``); never part of the default definitions, so ``msif demo``/``materialize`` skip them.
    ``executor``: the jobs' executor; default: the one ``$MSIF_EXECUTOR`` names (executors.py), else Dagster's."""
    install_progress_labels()  # progress lines name their asset and partition
    resources = build_resources(config)
    versioned = [*LINEAGE, *(a for a in EVAL_ASSETS if a is not ekfac_fidelity)]  # fidelity versions its own config
    observed: list = [*SOURCES, inbox_files]
    assets: list = [*(_with_config_versions(a, config.compute, config.columns) for a in versioned), ekfac_fidelity]
    checks = list(CHECKS)
    if config.is_demo:
        from .demo import DEMO_ASSETS, DEMO_CHECKS, default_world, demo_resource

        # the default world writes the inbox, both model directories, the fine-tuning data and
        # the queries: it is upstream of every observed input
        observed = [produced_by(default_world.key, a) for a in observed]
        assets += DEMO_ASSETS
        checks += DEMO_CHECKS
        resources["demo"] = demo_resource(config)
    if counterfactual is not None:
        from .counterfactual import build_counterfactual_assets

        assets += build_counterfactual_assets(config, config.compute, counterfactual)
    return dg.Definitions(
        assets=[*observed, *assets], asset_checks=checks, sensors=SENSORS, schedules=SCHEDULES,
        jobs=[observe_inputs_job, build_refresh_all_job(config)], resources=resources,
        executor=executor if executor is not None else configured_executor(),
    )
