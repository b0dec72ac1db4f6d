"""The counterfactual evaluation as assets (group ``counterfactual``; pipeline/counterfactual*.py).

    influence_scores + queries ─► cf_removal_sets ─► cf_removal_models[run] ─► counterfactual_eval
    corpus_shards ─► lds_subsets ─► lds_models[subset] ─┬─► lds_eval
    influence_scores ───────────────────────────────────┘

The retrained models are static partitions, one per run (``pipeline.counterfactual``): they run
in parallel, one Dagster run each. A model partition's code version is the recipe's identity
and its data version the content address of its training set (recipe, seed, documents) plus
its measured outputs, so nothing about a model depends on the scores except a removal set's
documents; LDS models do not depend on the scores at all. Models are cached by that address
(``pipeline.retrain``), so re-materializing a partition whose training set is unchanged reuses
its model. These assets are not part of ``msif demo``/``msif materialize`` (they retrain
dozens of models): ``build_definitions(config, counterfactual=True)`` adds them, for
``msif validate`` and the tests.
"""

import tomllib
from pathlib import Path
from typing import Any, Mapping

import dagster as dg

from ..config import ConfigError, MsifConfig
from ..pipeline import counterfactual as cf
from ..pipeline import counterfactual_steps as steps
from ..pipeline import retrain as rt
from ..pipeline.settings import ComputeSettings
from .automation import table_version, text_version
from .corpus import corpus_shards
from .queries import queries
from ..lake.storage import as_lake_path
from .resources import ComputeResource, InputsResource, LakeResource
from .scores import influence_scores

GROUP = "counterfactual"
DEFAULT_RECIPE = "msif_assets.demo.recipe:retrain"
VOLATILE = ("computed_at", "train_seconds")


def counterfactual_args(config: MsifConfig, overrides: Mapping[str, Any] | None = None) -> cf.CounterfactualArgs:
    """``[counterfactual]`` of the config file (if any) updated by ``overrides``; a bad key or
    value is a ConfigError naming the file."""
    raw: dict[str, Any] = {}
    if config.source != "defaults" and Path(config.source).is_file():
        raw = dict(tomllib.loads(Path(config.source).read_text(encoding="utf-8")).get("counterfactual", {}))
    raw.update(overrides or {})
    try:
        return cf.CounterfactualArgs.from_config(raw, f"{config.source}: [counterfactual]")
    except cf.CounterfactualConfigError as err:
        raise ConfigError(str(err)) from None


def recipe_spec(config: MsifConfig, args: cf.CounterfactualArgs) -> tuple[str, dict[str, Any]]:
    """The training recipe: ``args.recipe``, or the default world's (with its directory and size)."""
    if args.recipe:
        return args.recipe, dict(args.recipe_options)
    if not config.is_demo:
        raise ConfigError(f"{config.source}: [counterfactual] recipe — a user-brought world needs a training recipe, "
                          "recipe = \"package.module:function\" (see README, 'Counterfactual proof')")
    return DEFAULT_RECIPE, {"demo_dir": config.demo_dir, "size": config.demo_size, **args.recipe_options}


def _retrain(context: dg.AssetExecutionContext, lake: LakeResource, compute: ComputeResource, asset: str,
             run: cf.Run, recipe: tuple[str, dict], args: cf.CounterfactualArgs) -> dg.MaterializeResult:
    layout = lake.layout()
    queries_table = steps.evaluated_queries(layout, args)
    result = steps.retrain_run(layout, asset, run, rt.Recipe.load(*recipe), queries_table, compute.settings)
    out = result.outputs
    logps = out.column("logp").to_pylist()
    context.log.info(f"{asset}[{run.key}]: {'reused' if result.record['reused'] else 'trained'} {result.record['key']}")
    return dg.MaterializeResult(
        metadata={"model_key": result.record["key"], "reused": result.record["reused"], "seed": run.seed,
                  "train_seconds": result.record["train_seconds"], "n_train_docs": result.n_train_docs,
                  "mean_logp": sum(logps) / len(logps), "accuracy": sum(out.column("correct").to_pylist()) / len(logps),
                  "model_dir": dg.MetadataValue.path(result.record["model_dir"])},
        data_version=text_version(result.record["key"], table_version(out).value),
    )


def build_counterfactual_assets(config: MsifConfig, settings: ComputeSettings,
                                args: cf.CounterfactualArgs) -> list[dg.AssetsDefinition]:
    """The six assets for one config (partitions from ``settings.score_keys`` and ``args``)."""
    recipe = recipe_spec(config, args)
    identity = rt.Recipe.load(*recipe).identity
    removal_runs, lds_runs = cf.removal_runs(args, settings.score_keys), cf.lds_runs(args)
    if not lds_runs:
        raise ConfigError(f"{config.source}: [counterfactual] n_subsets = 0; LDS needs subsets (e.g. 24)")
    by_key = {r.key: r for r in removal_runs + lds_runs}
    chosen = ("ks", "gold", "n_subsets", "alpha", "noise_seeds", "noise_subsets", "seed", "subset_seed", "max_queries")
    sets_version = cf.digest({k: args.to_config()[k] for k in chosen}, "sets-1")[:12]
    model_version = cf.digest(identity, settings.dtype, args.max_queries, "models-1")[:12]
    eval_version = cf.digest(args.to_config(), identity, "eval-1")[:12]
    removal_parts = dg.StaticPartitionsDefinition([r.key for r in removal_runs])
    lds_parts = dg.StaticPartitionsDefinition([r.key for r in lds_runs])

    @dg.asset(group_name=GROUP, deps=[influence_scores, queries], code_version=sets_version, kinds={"parquet"})
    def cf_removal_sets(lake: LakeResource, inputs: InputsResource) -> dg.MaterializeResult:
        """Per removal run, each evaluated query's top-k documents by its method (or its gold
        documents); the run removes their union from pre-training."""
        ids = inputs.model_ids
        table = steps.write_removal_sets(lake.layout(), ids.ft, ids.pt, args, settings.score_keys)
        union = table.group_by("run_key").aggregate([("doc_id", "count_distinct")]).to_pylist()
        return dg.MaterializeResult(
            metadata={"rows": table.num_rows, "union_sizes": dg.MetadataValue.json({r["run_key"]: r["doc_id_count_distinct"] for r in union})},
            data_version=table_version(table, ignore=VOLATILE))

    @dg.asset(group_name=GROUP, deps=[corpus_shards], code_version=sets_version, kinds={"parquet"})
    def lds_subsets(lake: LakeResource) -> dg.MaterializeResult:
        """Random α-fractions of the corpus (seeded), one per LDS subset."""
        table = steps.write_lds_subsets(lake.layout(), args)
        return dg.MaterializeResult(metadata={"rows": table.num_rows, "subsets": args.n_subsets, "alpha": args.alpha},
                                    data_version=table_version(table, ignore=VOLATILE))

    @dg.asset(group_name=GROUP, partitions_def=removal_parts, deps=[cf_removal_sets, queries], code_version=model_version,
              kinds={"pytorch"})
    def cf_removal_models(context: dg.AssetExecutionContext, lake: LakeResource, compute: ComputeResource) -> dg.MaterializeResult:
        """Re-pre-trained and re-fine-tuned without one removal set (or with nothing removed:
        ``none``, ``none-s<seed>``), measured on the queries."""
        return _retrain(context, lake, compute, steps.REMOVAL_ASSET, by_key[context.partition_key], recipe, args)

    @dg.asset(group_name=GROUP, partitions_def=lds_parts, deps=[lds_subsets, queries], code_version=model_version,
              kinds={"pytorch"})
    def lds_models(context: dg.AssetExecutionContext, lake: LakeResource, compute: ComputeResource) -> dg.MaterializeResult:
        """Pre-trained on one α-subset and fine-tuned (``s<j>-seed<n>``: the same subset, another seed)."""
        return _retrain(context, lake, compute, steps.LDS_ASSET, by_key[context.partition_key], recipe, args)

    @dg.asset(group_name=GROUP, deps=[cf_removal_models, cf_removal_sets], code_version=eval_version, kinds={"parquet"})
    def counterfactual_eval(lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
        """Δ log p(answer | prompt) and greedy-answer flips of every removal against the ``none``
        retrain, with bootstrap CIs over queries; ``gold`` and ``none-s<seed>`` as references."""
        layout, ids = lake.layout(), inputs.model_ids
        outputs, summary = steps.removal_eval(layout, args, settings.score_keys, rt.Recipe.load(*recipe), ids.ft, compute.settings)
        drift = steps.baseline_drift(layout, args, outputs, inputs.path("finetuned_model"), compute.settings)
        rows = summary.to_pylist()
        png = steps.plot(rows, layout.eval_dir / "counterfactual.png", "removal")
        return dg.MaterializeResult(
            metadata={"table": dg.MetadataValue.md(steps.st.removal_markdown(rows)), "plot": dg.MetadataValue.md(_png(png)),
                      "plot_path": dg.MetadataValue.path(str(png)), "none_vs_lake_model_max_abs_logp_diff": drift,
                      "retrain_seconds_total": sum(r["train_seconds"] or 0.0 for r in rows),
                      "sql": "SELECT * FROM eval_counterfactual", "args": dg.MetadataValue.json(args.to_config())},
            data_version=text_version(table_version(outputs, ignore=VOLATILE).value, table_version(summary, ignore=VOLATILE).value))

    @dg.asset(group_name=GROUP, deps=[lds_models, lds_subsets, influence_scores], code_version=eval_version, kinds={"parquet"})
    def lds_eval(lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
        """LDS of every method and damping (mean Spearman over queries, bootstrap CI) and the
        retraining-noise ceiling (two seeds on the same subsets)."""
        layout, ids = lake.layout(), inputs.model_ids
        outputs, summary, per_query = steps.lds_eval(layout, args, settings.score_keys, rt.Recipe.load(*recipe), ids.ft, ids.pt,
                                                     compute.settings)
        rows = summary.to_pylist()
        png = steps.plot(rows, layout.eval_dir / "lds.png", "lds")
        return dg.MaterializeResult(
            metadata={"table": dg.MetadataValue.md(steps.st.lds_markdown(rows)), "plot": dg.MetadataValue.md(_png(png)),
                      "plot_path": dg.MetadataValue.path(str(png)), "sql": "SELECT * FROM eval_lds",
                      "args": dg.MetadataValue.json(args.to_config())},
            data_version=text_version(*(table_version(t, ignore=VOLATILE).value for t in (outputs, summary, per_query))))

    return [cf_removal_sets, lds_subsets, cf_removal_models, lds_models, counterfactual_eval, lds_eval]


def _png(path: Path) -> str:
    import base64

    return f"![counterfactual](data:image/png;base64,{base64.b64encode(as_lake_path(path).read_bytes()).decode()})"
