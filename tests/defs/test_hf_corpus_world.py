"""Hugging Face ``datasets`` shards through the real lineage: a ``save_to_disk`` directory and an
``.arrow`` file in the inbox materialize into the documents and chunks tables; the
``[inputs] text_column`` / ``id_column`` settings come from msif.toml to the ingestion step, and a
missing column fails that step naming the column and the setting."""

import hashlib
import json
from pathlib import Path

import dagster as dg
import datasets
import pytest
from datasets.arrow_writer import ArrowWriter

from msif_assets.app import runner
from msif_assets.config import ConfigError, MsifConfig, load_config
from msif_assets.defs.build import build_definitions
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.inputs import CorpusColumns

from .byo_world import COMPUTE, make_world, step_failures

datasets.disable_progress_bars()
SHARD_ASSETS = [dg.AssetKey("corpus_shards"), dg.AssetKey("doc_chunks")]


def _sql(root: Path, query: str) -> list[dict]:
    catalog = Catalog.open(root / "lake")
    try:
        return catalog.query(query).to_pylist()
    finally:
        catalog.close()


def _materialize(root: Path, inputs: dict, columns: CorpusColumns, shards: set[str],
                 instance: dg.DagsterInstance | None = None) -> dg.DagsterInstance:
    defs = build_definitions(MsifConfig(lake_root=str(root / "lake"), inputs=inputs, compute=COMPUTE, columns=columns))
    instance = instance or dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    runner.execute(defs, instance, {key: shards for key in SHARD_ASSETS})
    return instance


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    inputs = make_world(root, n_shards=1)  # shard-0.jsonl and two tiny models (for the tokenizer)
    inbox = Path(inputs["inbox"])
    datasets.Dataset.from_dict({
        "doc_id": ["wiki-ada", "wiki-bob", "wiki-bob", "wiki-blank"],
        "text": ["Ada was born in Paris . Ada likes the sea .", "Bob was born in Oslo .", "Bob again", "   "],
        "source": ["wiki", "wiki", "wiki", "wiki"],
    }).save_to_disk(str(inbox / "wiki"))
    with ArrowWriter(path=str(inbox / "web.arrow")) as writer:  # no id column: ids are derived
        writer.write_batch({"text": ["Cyd was born in Lima .", "Dee was born in Rome ."], "url": ["u1", "u2"]})
        writer.finalize()
    _materialize(root, inputs, CorpusColumns(), {"shard-0", "wiki", "web"})
    return root, inputs


def test_dataset_shards_materialize_into_documents_and_chunks(world):
    root, _ = world
    docs = _sql(root, "SELECT shard, doc_id, text, meta FROM documents WHERE shard IN ('wiki', 'web') ORDER BY doc_id")
    assert [(d["shard"], d["doc_id"]) for d in docs] == [("web", "web:1"), ("web", "web:2"), ("wiki", "wiki-ada"), ("wiki", "wiki-bob")]
    assert docs[2]["text"] == "Ada was born in Paris . Ada likes the sea ."
    assert json.loads(docs[0]["meta"]) == {"url": "u1"} and json.loads(docs[2]["meta"]) == {"source": "wiki"}
    chunks = _sql(root, "SELECT DISTINCT shard, doc_id FROM chunks WHERE shard IN ('wiki', 'web') ORDER BY doc_id")
    assert [c["doc_id"] for c in chunks] == ["web:1", "web:2", "wiki-ada", "wiki-bob"]
    assert _sql(root, "SELECT count(*) AS n FROM documents WHERE shard = 'shard-0'")[0]["n"] == 9  # JSONL as before


def test_dataset_bad_rows_are_rejects_in_sql(world):
    root, inputs = world
    rejects = _sql(root, "SELECT file, line, field, reason FROM rejects WHERE source = 'corpus-wiki' ORDER BY line")
    assert [(r["line"], r["field"]) for r in rejects] == [(3, "doc_id"), (4, "text")]
    assert "duplicate doc_id 'wiki-bob'" in rejects[0]["reason"] and rejects[1]["reason"] == "empty or blank string"
    assert {r["file"] for r in rejects} == {str(Path(inputs["inbox"]).resolve() / "wiki")}


def test_custom_columns_from_msif_toml_and_a_missing_column_fails_its_step(world, tmp_path):
    root, inputs = world
    inbox = tmp_path / "inbox"
    datasets.Dataset.from_dict({"uid": [11, 12], "body": ["Eve was born in Paris .", "Fay was born in Oslo ."],
                                "author": ["e", "f"]}).save_to_disk(str(inbox / "books"))
    datasets.Dataset.from_dict({"uid": [13], "text": ["Gus was born in Lima ."]}).save_to_disk(str(inbox / "old"))
    toml = tmp_path / "msif.toml"
    paths = {**inputs, "inbox": str(inbox)}
    toml.write_text("[lake]\nroot = \"lake\"\n[inputs]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in paths.items())
                    + "text_column = \"body\"\nid_column = \"uid\"\n")
    config = load_config(toml)
    assert config.columns == CorpusColumns(text="body", id="uid") and set(config.inputs) == set(paths)

    _materialize(tmp_path, paths, config.columns, {"books"})
    docs = _sql(tmp_path, "SELECT doc_id, text, meta FROM documents ORDER BY doc_id")
    assert [(d["doc_id"], d["text"]) for d in docs] == [("11", "Eve was born in Paris ."), ("12", "Fay was born in Oslo .")]
    assert json.loads(docs[0]["meta"]) == {"author": "e"}
    assert [c["doc_id"] for c in _sql(tmp_path, "SELECT DISTINCT doc_id FROM chunks ORDER BY doc_id")] == ["11", "12"]

    instance = dg.DagsterInstance.ephemeral()
    with pytest.raises(Exception):
        _materialize(tmp_path, paths, config.columns, {"old"}, instance)
    (failure,) = step_failures(instance)
    assert f"{(inbox / 'old').resolve()}: column 'body'" in failure, failure
    assert "its columns: 'uid', 'text'" in failure and "[inputs] text_column in msif.toml" in failure


def test_column_settings_are_validated_and_version_the_ingestion(tmp_path):
    inputs = {k: str(tmp_path / k) for k in ("inbox", "pretrained_model", "finetuned_model", "finetune_data", "queries")}
    toml = tmp_path / "msif.toml"
    toml.write_text("[inputs]\ntext_column = \"\"\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in inputs.items()))
    with pytest.raises(ConfigError, match=r"\[inputs\] text_column = '' — give a column name"):
        load_config(toml)
    toml.write_text("[inputs]\nid_column = \"uid\"\n")
    with pytest.raises(ConfigError, match=r"your own corpus"):
        load_config(toml)

    def versions(columns: CorpusColumns) -> dict[str, str]:
        defs = build_definitions(MsifConfig(lake_root=str(tmp_path / "lake"), inputs=inputs, compute=COMPUTE, columns=columns))
        graph = defs.resolve_asset_graph()
        return {k: graph.get(dg.AssetKey(k)).code_version for k in ("corpus_shards", "doc_chunks")}

    default, custom = versions(CorpusColumns()), versions(CorpusColumns(text="body"))
    assert default["corpus_shards"] == "1-" + hashlib.sha256(b"{}").hexdigest()[:12]  # as before the setting: no re-ingest
    assert custom["corpus_shards"] != default["corpus_shards"]  # a new column setting re-ingests every shard
    assert custom["doc_chunks"] == default["doc_chunks"]  # … and only data changes flow further
