"""The counterfactual evaluation on a small world, end to end with real retraining: a world built
by the default world's code with a small config, brought as *user inputs* with the training recipe
named in msif.toml (the hook a user-brought world uses), the lineage up to the influence scores,
then every removal and LDS retrain as Dagster partitions in two worker processes, the two
evaluations, their lake tables and SQL views. Checks that can fail: removing the gold documents
lowers log p(answer) against the no-removal retrain; the removed documents are really absent;
LDS of scores permuted at random is 0 within its interval; a second run retrains nothing."""

import json
import os
from pathlib import Path

import dagster as dg
import numpy as np
from dagster._core.definitions.data_version import DATA_VERSION_TAG
import pytest

from msif_assets.app import runner
from msif_assets.app import validate as va
from msif_assets.config import ConfigError, load_config
from msif_assets.defs.build import build_definitions
from msif_assets.defs.counterfactual import counterfactual_args
from msif_assets.lake import tables
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.layout import LakeLayout
from msif_assets.pipeline import counterfactual as cf
from msif_assets.pipeline import counterfactual_stats as st
from msif_assets.pipeline import retrain as rt
from msif_assets.pipeline.evaluation import load_chunk_scores

pytestmark = pytest.mark.slow

# Small enough to retrain in ~3 s on one core, large enough that held-out facts are learned
# (held-out accuracy ≈ 0.6 after fine-tuning), so removing gold documents can matter.
WORLD = dict(seed=7, n_finetune_entities=20, n_heldout_entities=6, relations=("birth_city", "sport"), docs_per_fact=3,
             n_distractor_docs=6, n_shards=2)
TRAIN = dict(hidden_size=64, num_layers=2, num_heads=2, max_length=64, pretrain_epochs=30, pretrain_batch_size=16,
             pretrain_lr=3e-3, finetune_epochs=4, finetune_batch_size=8, finetune_lr=1e-3, num_threads=1, device="cpu")
COUNTERFACTUAL = {"ks": [3], "n_subsets": 8, "noise_subsets": 4, "bootstrap": 500, "workers": 2}
EVALS = ("fact_tracing_eval", "ekfac_fidelity", "param_proximity", "influence_share")


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from msif_assets.defs.demo import write_queries_with_gold
    from msif_assets.demo.build import build_default_world
    from msif_assets.demo.train import TrainConfig
    from msif_assets.demo.world import WorldConfig

    root = tmp_path_factory.mktemp("counterfactual")
    built = build_default_world(root / "demo", WorldConfig(**WORLD), TrainConfig(**TRAIN))
    write_queries_with_gold(root / "demo" / "world", 12)
    cf_section = {**COUNTERFACTUAL, "recipe": "msif_assets.demo.recipe:retrain",
                  "recipe_options": {"demo_dir": str(root / "demo"), "train": TRAIN}}
    (root / "msif.toml").write_text("\n".join([
        '[lake]\nroot = "lake"', "[inputs]",
        'inbox = "demo/world/corpus"', 'pretrained_model = "demo/models/pretrained"',
        'finetuned_model = "demo/models/finetuned"', 'finetune_data = "demo/world/finetune.jsonl"',
        'queries = "demo/world/lake_queries.jsonl"',
        '[compute]\ndampings = ["rel:0.1"]\nall_chunks_below = 100000\nbatch_size = 16\ndevice = "cpu"',
        "[counterfactual]", *(f"{k} = {_toml(v)}" for k, v in cf_section.items()), ""]))
    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(root / "dagster_home")  # the worker processes share this instance
    (root / "dagster_home").mkdir()
    (root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    try:
        config = load_config(root / "msif.toml")
        instance = dg.DagsterInstance.get()
        defs = build_definitions(config)
        runner.register_shards(instance, config.resolved_inputs()["inbox"])
        runner.observe_inputs(defs, instance)
        lineage = {k: v for k, v in runner.all_requests(defs, instance).items() if k.to_user_string() not in EVALS}
        runner.execute(defs, instance, lineage)
        args = counterfactual_args(config)
        first = va.run_counterfactual(config, args, instance)
        yield {"root": root, "config": config, "args": args, "instance": instance, "first": first,
               "layout": LakeLayout(config.lake_root), "built": built}
    finally:
        if previous is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = previous


def _summary(world) -> dict[str, dict]:
    return {r["run_key"]: r for r in tables.read_eval(world["layout"], "counterfactual_summary").to_pylist()}


def test_every_run_is_a_partition_and_every_table_and_view_is_filled(world):
    args, config = world["args"], world["config"]
    removal, lds = cf.removal_runs(args, config.compute.score_keys), cf.lds_runs(args)
    assert len(world["first"].ran) == len(removal) + len(lds) == 9 + 12 and world["first"].evaluated
    with Catalog.open(config.lake_root) as catalog:
        rows = catalog.query("SELECT * FROM eval_counterfactual").to_pylist()
        lds_rows = catalog.query("SELECT * FROM eval_lds").to_pylist()
        deltas = catalog.query("SELECT count(*) AS n, count(DISTINCT run_key) AS runs FROM counterfactual_deltas").to_pylist()[0]
    labels = {(r["label"], r["k"]) for r in rows}
    assert labels == {("none", None), ("none (seed 1)", None), ("gold", None), *((m, 3) for m in
                      ("ms-if@rel:0.1", "ss-if@rel:0.1", "gdp", "repsim", "bm25", "random"))}
    assert all(r["n_queries"] == 12 and r["delta_ci_lo"] <= r["mean_delta_logp"] <= r["delta_ci_hi"] for r in rows)
    assert {r["label"] for r in lds_rows} == {"ms-if@rel:0.1", "ss-if@rel:0.1", "gdp", "repsim", "bm25", "random", "reseed (seed 1)"}
    assert all(r["n_subsets"] == (4 if r["method"] == "reseed" else 8) for r in lds_rows)
    assert all(json.loads(r["args"])["ks"] == [3] for r in rows + lds_rows)  # the arguments travel with the results
    assert deltas == {"n": 12 * (len(removal) - 1), "runs": len(removal) - 1}
    record = world["instance"].fetch_materializations(dg.AssetKey("lds_eval"), limit=1).records[0]
    meta = record.asset_materialization.metadata
    assert Path(meta["plot_path"].value).read_bytes()[:4] == b"\x89PNG" and meta["plot"].value.startswith("![")


def test_removing_gold_documents_lowers_log_p_of_the_answer(world):
    gold, none = _summary(world)["gold"], _summary(world)["none"]
    assert none["mean_delta_logp"] == 0.0 and none["flip_rate"] == 0.0
    assert gold["n_removed"] > 0
    assert gold["mean_delta_logp"] < 0 and gold["delta_ci_hi"] < 0, gold


def test_removal_runs_train_without_exactly_their_union(world):
    layout = world["layout"]
    n_docs = sum(tables.read_docs(layout, s).num_rows for s in tables.list_shards(layout))
    removals = tables.read_eval(layout, "counterfactual_removals").to_pylist()
    outputs = tables.read_eval(layout, "counterfactual_outputs").to_pylist()
    for run_key, row in _summary(world).items():
        union = {r["doc_id"] for r in removals if r["run_key"] == run_key}
        assert row["n_removed"] == len(union)
        trained = {o["n_train_docs"] for o in outputs if o["run_key"] == run_key}
        assert trained == {n_docs - len(union)}
        record = rt.read_record(layout, rt.read_run_pointer(layout, "cf_removal_models", run_key)["key"])
        assert record["n_train_docs"] == n_docs - len(union)
    per_query = {}
    for r in removals:
        if r["run_key"] == "gdp-k3":
            per_query.setdefault(r["query_id"], []).append(r["rank"])
    assert len(per_query) == 12 and all(sorted(v) == [1, 2, 3] for v in per_query.values())


def test_lds_of_randomly_permuted_scores_is_zero_within_its_interval(world):
    layout, args = world["layout"], world["args"]
    outputs = tables.read_eval(layout, "lds_outputs").to_pylist()
    subsets = tables.read_eval(layout, "lds_subsets").to_pylist()
    main = [r for r in cf.lds_runs(args) if r.kind == "lds"]
    qids = sorted({o["query_id"] for o in outputs})
    docs = sorted({d["doc_id"] for s in tables.list_shards(layout) for d in tables.read_docs(layout, s).to_pylist()})
    logp = {(o["run_key"], o["query_id"]): o["logp"] for o in outputs}
    measured = np.array([[logp[(r.key, q)] for q in qids] for r in main])
    members = np.array([[any(s["subset"] == r.subset and s["doc_id"] == d for s in subsets) for d in docs] for r in main], float)
    scores = cf.document_scores(load_chunk_scores(layout, _model_ids(layout)))
    key = ("ms-if", world["config"].compute.dampings[0])
    rng = np.random.default_rng(0)
    permuted = {q: dict(zip(sorted(by_doc), rng.permutation([by_doc[d] for d in sorted(by_doc)])))
                for q, by_doc in scores[key].items()}
    (real,), _ = st.lds_rows(measured, members, {key: scores[key]}, qids, docs, 500, 0.95)
    (null,), _ = st.lds_rows(measured, members, {key: permuted}, qids, docs, 500, 0.95)
    stored = {(r["method"], r["damping"]): r for r in tables.read_eval(layout, "lds_summary").to_pylist()}
    assert real["lds"] == pytest.approx(stored[("ms-if", 0.1)]["lds"])  # the table holds what the definition gives
    assert null["ci_lo"] <= 0.0 <= null["ci_hi"], null


def _model_ids(layout):
    from msif_assets.pipeline.models import ModelIds

    with Catalog.open(layout.root) as catalog:
        row = catalog.query("SELECT DISTINCT pt_model, ft_model FROM influence").to_pylist()
    assert len(row) == 1
    return ModelIds(row[0]["pt_model"], row[0]["ft_model"])


def test_second_run_retrains_nothing_and_a_forced_partition_reuses_its_model(world):
    config, args, instance = world["config"], world["args"], world["instance"]
    again = va.run_counterfactual(config, args, instance)
    assert again.ran == [] and len(again.skipped) == len(world["first"].ran) and again.evaluated
    defs = build_definitions(config, counterfactual=args)
    key = dg.AssetKey("lds_models")
    record = lambda: next(r for r in instance.fetch_materializations(key, limit=100).records if r.partition_key == "s00")  # noqa: E731
    old = record()
    assert va._materialize("lds_models", "s00", defs, instance)[2] is None
    new = record()
    assert new.storage_id != old.storage_id and new.asset_materialization.metadata["reused"].value is True
    assert new.asset_materialization.tags[DATA_VERSION_TAG] == old.asset_materialization.tags[DATA_VERSION_TAG]


def test_models_do_not_depend_on_scores_except_through_removal_sets(world):
    defs = build_definitions(world["config"], counterfactual=world["args"])
    graph = defs.resolve_asset_graph()
    upstream = graph.get(dg.AssetKey("lds_models")).parent_keys
    assert dg.AssetKey("influence_scores") not in upstream and dg.AssetKey("cf_removal_sets") not in upstream
    assert dg.AssetKey("influence_scores") not in graph.get(dg.AssetKey("cf_removal_models")).parent_keys
    default = build_definitions(world["config"]).resolve_asset_graph()  # msif demo/materialize never retrain
    assert not {k.to_user_string() for k in default.materializable_asset_keys} & {"cf_removal_models", "lds_models",
                                                                                  "counterfactual_eval", "lds_eval"}


def test_bad_counterfactual_settings_are_one_error_naming_the_key(world, tmp_path):
    with pytest.raises(ConfigError, match=r"\[counterfactual\].*ks"):
        counterfactual_args(world["config"], {"ks": [0]})
    with pytest.raises(ConfigError, match="unknown key"):
        counterfactual_args(world["config"], {"subsets": 3})
    with pytest.raises(rt.RecipeError, match="cannot import"):
        rt.Recipe.load("no_such_module_xyz:train", {})
