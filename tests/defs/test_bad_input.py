"""Bad input through the real lineage: rejects are visible in SQL, nothing silently dropped;
mismatched models fail before any compute with every mismatch named."""

from pathlib import Path

import dagster as dg
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif_assets.app import runner
from msif_assets.defs.build import LINEAGE
from msif_assets.lake.catalog import Catalog

from .byo_world import byo_definitions, make_world, save_model


@pytest.fixture()
def world(tmp_path):
    inputs = make_world(tmp_path, n_shards=1)
    return tmp_path, inputs


def test_bad_corpus_rows_become_rejects_visible_in_sql(world):
    root, inputs = world
    bad = Path(inputs["inbox"]) / "shard-bad.jsonl"
    bad.write_bytes(
        b'{"doc_id": "ok-1", "text": "Ada was born in Paris ."}\n'
        b'{"doc_id": "broken", "text": \n'
        b'{"text": "no id here"}\n'
        b'{"doc_id": "empty", "text": ""}\n'
        b'{"doc_id": "ok-1", "text": "duplicate id"}\n'
        b'{"doc_id": "latin1", "text": "caf\xe9"}\n'
    )
    defs = byo_definitions(root, inputs)
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    runner.execute(defs, instance, {dg.AssetKey("corpus_shards"): {"shard-bad"}})
    catalog = Catalog.open(root / "lake")
    rejects = catalog.query("SELECT line, field, reason FROM rejects WHERE source = 'corpus-shard-bad' ORDER BY line").to_pylist()
    assert [r["line"] for r in rejects] == [2, 3, 4, 5, 6]
    assert [r["field"] for r in rejects][1:4] == ["doc_id", "text", "doc_id"]
    docs = catalog.query("SELECT doc_id FROM documents WHERE shard = 'shard-bad'").column("doc_id").to_pylist()
    assert docs == ["ok-1"]  # 1 kept + 5 rejected = all 6 lines accounted for


def test_mismatched_models_fail_naming_every_mismatch(world):
    root, inputs = world
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs["pretrained_model"])
    config = GPTNeoXConfig.from_pretrained(inputs["pretrained_model"])
    config.intermediate_size = 48
    torch.manual_seed(3)
    save_model(GPTNeoXForCausalLM(config), tokenizer, Path(inputs["finetuned_model"]))
    defs = byo_definitions(root, inputs)
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    with pytest.raises(Exception):  # the lineage only: the evaluations (ekfac_fidelity, ...) are not under test
        runner.execute(defs, instance, runner.all_requests(defs, instance, [a.key for a in LINEAGE]))
    failures = [
        e.dagster_event.event_specific_data.error
        for e in instance.all_logs(instance.get_runs(limit=1)[0].run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "STEP_FAILURE"
    ]
    assert failures, "the run must fail"
    cause = failures[0].cause.message if failures[0].cause else failures[0].message
    assert "layers.0.mlp.dense_h_to_4h.d_out" in cause and "layers.1.mlp.dense_4h_to_h.d_in" in cause, cause
    # it failed at the first step that touches a model: no factor was computed
    assert not list((root / "lake").glob("factors/*/*/*.safetensors"))


def test_missing_model_weights_name_the_directory(world):
    root, inputs = world
    for f in Path(inputs["finetuned_model"]).glob("*.safetensors"):
        f.unlink()
    defs = byo_definitions(root, inputs)
    with pytest.raises(Exception, match=r"finetuned_model|ft|safetensors"):
        runner.observe_inputs(defs, dg.DagsterInstance.ephemeral())
