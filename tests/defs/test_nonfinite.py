"""Non-finite numbers through the real lineage: NaN weights stop at load naming the file and
tensor; a finite but absurd weight that overflows float32 activations stops the scoring step
before a NaN reaches the influence table; the scores check blocks what is downstream of it;
param_proximity raises naming the tensors instead of storing nan."""

from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from msif_assets.app import runner
from msif_assets.lake.catalog import Catalog
from msif_assets.pipeline.model_analysis import parameter_proximity

from .byo_world import byo_definitions, make_world, step_failures, write_jsonl

EMBED = "gpt_neox.embed_in.weight"
UNK = 1  # build_tokenizer: 0 <pad>, 1 <unk>, 2 <bos>, 3 <eos>


def _edit_weights(model_dir: str | Path, edit) -> Path:
    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def _materialize_all(root: Path, inputs: dict, **compute):
    defs = byo_definitions(root, inputs, **compute)
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    with pytest.raises(Exception):
        runner.execute(defs, instance, runner.all_requests(defs, instance))
    return instance


def _score_files(root: Path) -> list[Path]:
    return sorted((root / "lake" / "scores").glob("*/*/*.parquet"))


def test_nan_weights_fail_at_load_naming_file_and_tensor(tmp_path):
    inputs = make_world(tmp_path, n_shards=1)

    def nan_row(t):
        t[EMBED][UNK, :3] = float("nan")

    weights = _edit_weights(inputs["pretrained_model"], nan_row)
    instance = _materialize_all(tmp_path, inputs)
    failures = step_failures(instance)
    assert failures, "the run must fail"
    named = [f for f in failures if f"non-finite values in {weights.resolve()}: {EMBED} (3 NaN) first at [1, 0]" in f]
    assert named, failures
    assert "re-export" in named[0] or "export the model again" in named[0], named[0]
    assert all("non-finite values in" in f for f in failures), failures  # every failure is the load check
    # it failed where the pretrained model is first loaded: no pre-trained factor, no score
    assert not list((tmp_path / "lake").glob("factors/pt/*/*.safetensors"))
    assert not _score_files(tmp_path)


def _unknown_word_world(root: Path) -> dict:
    """One factor shard; shard-9's text is mostly words the tokenizer has never seen (<unk>),
    and the <unk> embedding row of both models is finite but huge: the activations of
    <unk> tokens overflow float32, so their gradients — and scores — are NaN."""
    inputs = make_world(root, n_shards=1)
    write_jsonl(Path(inputs["inbox"]) / "shard-9.jsonl", [
        {"doc_id": "unk-1", "text": "Zork quux blorp ."},
        {"doc_id": "unk-2", "text": "Ada was born in Zork ."},
    ])

    def huge_unk(t):
        t[EMBED][UNK] = 1e30

    for model in ("pretrained_model", "finetuned_model"):
        _edit_weights(inputs[model], huge_unk)
    return inputs


def test_overflowing_scores_fail_the_shard_and_never_reach_the_table(tmp_path):
    inputs = _unknown_word_world(tmp_path)
    instance = _materialize_all(tmp_path, inputs, factor_shards=["shard-0"])  # loads fine: the weights are finite
    failures = step_failures(instance)
    named = [f for f in failures if "shard shard-9: non-finite influence scores" in f]
    assert named, failures
    message = named[0]
    for part in ("ms-if (damping rel:0.1)", "gdp", "unk-1#0", "q-eve", "nothing written", "<unk>"):
        assert part in message, (part, message)
    # shard-0 was scored; shard-9 was not written, and no non-finite number is in the table
    assert [p.parent.name for p in _score_files(tmp_path)] == ["shard=shard-0"]
    catalog = Catalog.open(tmp_path / "lake")
    try:
        stats = catalog.query(
            "SELECT count(*) AS n, count(*) FILTER (WHERE NOT isfinite(score) OR NOT coalesce(isfinite(score_mlp), true) "
            "OR NOT coalesce(isfinite(score_attn), true)) AS nonfinite, count(*) FILTER (WHERE shard = 'shard-9') AS s9 "
            "FROM influence").to_pylist()[0]
    finally:
        catalog.close()
    assert stats["n"] > 0 and stats["nonfinite"] == 0 and stats["s9"] == 0, stats


def test_failed_scores_check_blocks_downstream(tmp_path, monkeypatch):
    """A NaN that slips past scoring (here: written by a patched step) fails the blocking
    check, and nothing downstream of the scores is materialized from it."""
    import msif_assets.defs.scores as scores_defs
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    real = scores_defs.score_shard

    def with_nan(*args, **kwargs):
        table = real(*args, **kwargs)
        scores = table.column("score").to_pylist()
        column = table.schema.get_field_index("score")
        return table.set_column(column, "score", pa.array([float("nan")] + scores[1:], pa.float64()))

    monkeypatch.setattr(scores_defs, "score_shard", with_nan)
    inputs = make_world(tmp_path, n_shards=1)
    instance = _materialize_all(tmp_path, inputs)
    key = dg.AssetCheckKey(dg.AssetKey("influence_scores"), "scores_finite_and_unique")
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record.status == AssetCheckExecutionRecordStatus.FAILED
    evaluation = record.event.dagster_event.event_specific_data
    assert evaluation.metadata["nonfinite"].value == 1
    assert any("scores_finite_and_unique" in f for f in step_failures(instance)), step_failures(instance)
    for downstream in ("influence_share", "fact_tracing_eval"):
        assert instance.get_latest_materialization_event(dg.AssetKey(downstream)) is None, downstream


def test_param_proximity_zero_pretrained_scope_names_the_tensors(tmp_path):
    """An all-zero θ_pt over a scope (here every attention weight and bias) makes the relative
    distance undefined: the step fails naming the scope and its tensors, nothing is stored."""
    inputs = make_world(tmp_path, n_shards=1)

    def zero_attention(t):
        for name in t:
            if ".attention.query_key_value." in name or ".attention.dense." in name:
                t[name].zero_()

    _edit_weights(inputs["pretrained_model"], zero_attention)
    defs = byo_definitions(tmp_path, inputs)
    instance = dg.DagsterInstance.ephemeral()
    runner.observe_inputs(defs, instance)
    with pytest.raises(Exception):
        runner.execute(defs, instance, {dg.AssetKey("param_proximity"): {None}})
    failures = step_failures(instance)
    assert any("scope 'tracked-attn'" in f and "gpt_neox.layers.0.attention.query_key_value" in f
               and "pretrained_model" in f for f in failures), failures
    assert not (tmp_path / "lake" / "eval" / "param_proximity.parquet").exists()


def test_param_proximity_names_nonfinite_tensors(tmp_path):
    """The load check keeps NaN weights out of the lineage; parameter_proximity itself still
    refuses to return nan for models built in memory, naming the tensor."""
    from transformers import GPTNeoXForCausalLM

    from msif_assets.engine import shared_modules

    inputs = make_world(tmp_path, n_shards=1)
    pt = GPTNeoXForCausalLM.from_pretrained(inputs["pretrained_model"])
    ft = GPTNeoXForCausalLM.from_pretrained(inputs["finetuned_model"])
    specs = shared_modules(pt, ft, "all")
    assert all(row.relative_distance > 0 for row in parameter_proximity(pt, ft, specs))
    with torch.no_grad():
        ft.gpt_neox.layers[1].mlp.dense_4h_to_h.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"θ_ft gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight \(1 NaN"):
        parameter_proximity(pt, ft, specs)
