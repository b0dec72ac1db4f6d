"""Faulty corpus shards through the real lineage (real Dagster, real LanceDB), the way
``msif materialize`` runs it: lone surrogates, empty shards, edited shard files, doc_ids
repeated across shards, symlinks out of the inbox and files the inbox does not read."""

import json
import logging
from pathlib import Path

import dagster as dg
import pytest

from msif_assets.app import runner
from msif_assets.app.lineage import bring_up_to_date
from msif_assets.config import MsifConfig
from msif_assets.defs.build import build_definitions
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.layout import LakeLayout
from msif_assets.lake.vectors import ChunkVectorStore

from .byo_world import COMPUTE, make_world

SHARD_ASSETS = ("corpus_shards", "doc_chunks", "doc_embeddings", "candidates", "influence_scores")


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    inputs = make_world(root, n_shards=1)  # shard-0.jsonl: s0-d0 … s0-d7, s0-long
    inbox = Path(inputs["inbox"])
    # 1. lone surrogates (JSON escapes without their pair) in text, doc_id, metadata value and key
    (inbox / "shard-sur.jsonl").write_bytes(
        b'{"doc_id": "sur-ok", "text": "Ada was born in Paris ."}\n'
        b'{"doc_id": "a", "text": "bad \\ud800 x"}\n'
        b'{"doc_id": "b\\udfff", "text": "Bob met Oslo ."}\n'
        b'{"doc_id": "c", "text": "Cyd met Lima .", "source": "web \\ud83d"}\n'
        b'{"doc_id": "d", "text": "Dee met Rome .", "k\\udc00": 1}\n'
        b'{"doc_id": "sur-pair", "text": "Eve likes the sea . \\ud83d\\ude00"}\n'
    )
    # 2. shards with no accepted row: an empty file, a UTF-16 file
    (inbox / "shard-empty.jsonl").write_bytes(b"")
    (inbox / "shard-u16.jsonl").write_bytes(
        "".join(json.dumps({"doc_id": f"u{i}", "text": "Fay met Oslo ."}) + "\n" for i in range(3)).encode("utf-16"))
    # 4. a doc_id that shard-0 (named first) has
    (inbox / "shard-dup.jsonl").write_bytes(
        _line({"doc_id": "s0-d0", "text": "Gus met Rome ."}) + _line({"doc_id": "dup-own", "text": "Hal met Lima ."}))
    # 5. links resolving outside the inbox are never read
    outside = root / "outside.jsonl"
    outside.write_bytes(_line({"doc_id": "secret", "text": "Ada met Paris ."}))
    (inbox / "shard-leak.jsonl").symlink_to(outside)
    (inbox / "shard-passwd.txt").symlink_to("/etc/passwd")
    # 6. upper-case suffix (read), CSV and a hidden file (reported)
    (inbox / "UPPER.JSONL").write_bytes(_line({"doc_id": "up-1", "text": "Eve met Lima ."}))
    (inbox / "notes.csv").write_text("doc_id,text\nx,Ada met Rome .\n")
    (inbox / ".draft.jsonl").write_bytes(_line({"doc_id": "draft", "text": "Bob met Paris ."}))

    # every shard is in the factor set, the empty ones too: their statistics add nothing to the merge
    config = MsifConfig(lake_root=str(root / "lake"), inputs=inputs, compute=COMPUTE)
    defs = build_definitions(config)
    instance = dg.DagsterInstance.ephemeral()
    ran, refreshed, new_shards, _ = bring_up_to_date(config, defs, instance)  # what `msif materialize` does
    return {"root": root, "inputs": inputs, "inbox": inbox, "config": config, "defs": defs, "instance": instance,
            "ran": ran, "new_shards": new_shards}


def _sql(world, query: str) -> list[dict]:
    catalog = Catalog.open(world["root"] / "lake")
    try:
        return catalog.query(query).to_pylist()
    finally:
        catalog.close()


def _docs(world, shard: str) -> list[str]:
    return [r["doc_id"] for r in _sql(world, f"SELECT doc_id FROM documents WHERE shard = '{shard}' ORDER BY doc_id")]


def _rejects(world, shard: str) -> list[dict]:
    return _sql(world, f"SELECT file, line, field, reason FROM rejects WHERE source = 'corpus-{shard}' ORDER BY line")


def test_every_shard_materializes_all_the_way_down(world):
    shards = set(world["instance"].get_dynamic_partitions("shards"))
    assert shards == {"shard-0", "shard-sur", "shard-empty", "shard-u16", "shard-dup", "UPPER"}
    assert {(a, s) for a in SHARD_ASSETS for s in shards} <= world["ran"].keys()


def test_lone_surrogates_become_rejects_and_the_rest_of_the_shard_loads(world):
    assert _docs(world, "shard-sur") == ["sur-ok", "sur-pair"]  # a valid surrogate pair is an emoji
    rejects = _rejects(world, "shard-sur")
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "text"), (3, "doc_id"), (4, "source"), (5, "k\\udc00")]
    assert all("lone surrogate" in r["reason"] and r["file"].endswith("shard-sur.jsonl") for r in rejects)
    raw = _sql(world, "SELECT raw FROM rejects WHERE source = 'corpus-shard-sur' AND line = 2")[0]["raw"]
    assert "\\ud800" in raw


def test_shards_without_documents_are_empty_partitions(world):
    layout = LakeLayout(world["root"] / "lake")
    store = ChunkVectorStore(layout.embeddings_dir)
    for shard in ("shard-empty", "shard-u16"):
        assert _docs(world, shard) == []
        assert _sql(world, f"SELECT count(*) AS n FROM chunks WHERE shard = '{shard}'")[0]["n"] == 0
        assert _sql(world, f"SELECT count(*) AS n FROM candidates WHERE shard = '{shard}'")[0]["n"] == 0
        assert _sql(world, f"SELECT count(*) AS n FROM influence WHERE shard = '{shard}'")[0]["n"] == 0
        assert store.count(shard) == 0
    u16 = _rejects(world, "shard-u16")
    assert [r["line"] for r in u16] == [1, 2, 3, 4] and all("UTF-16" in r["reason"] for r in u16)  # 4: the last "\n\0"
    assert _rejects(world, "shard-empty") == []
    assert store.count("shard-0") > 0 and _sql(world, "SELECT count(*) AS n FROM influence WHERE shard = 'shard-0'")[0]["n"] > 0


def test_doc_id_in_two_shards_is_kept_by_the_first_and_rejected_by_the_other(world):
    assert "s0-d0" in _docs(world, "shard-0")
    assert _docs(world, "shard-dup") == ["dup-own"]
    (reject,) = _rejects(world, "shard-dup")
    assert reject["line"] == 1 and reject["field"] == "doc_id"
    assert "'shard-0'" in reject["reason"] and "'shard-dup'" in reject["reason"] and "shard-0.jsonl:1" in reject["reason"]
    everywhere = _sql(world, "SELECT doc_id, count(*) AS n FROM documents GROUP BY doc_id HAVING count(*) > 1")
    assert everywhere == []


def test_links_out_of_the_inbox_are_refused_and_never_read(world, caplog):
    assert "secret" not in {r["doc_id"] for r in _sql(world, "SELECT doc_id FROM documents")}
    assert not {"shard-leak", "shard-passwd"} & set(world["instance"].get_dynamic_partitions("shards"))
    assert not _sql(world, "SELECT file FROM rejects WHERE file LIKE '%passwd%' OR file LIKE '%outside%'")
    problems = world["new_shards"].problems
    leak = [p for p in problems if "shard-leak.jsonl" in p]
    assert len(leak) == 1 and "outside the inbox" in leak[0] and "refused" in leak[0]
    assert any("shard-passwd.txt" in p and "/etc/passwd" in p for p in problems)


def test_files_the_inbox_does_not_read_are_reported(world, caplog):
    assert _docs(world, "UPPER") == ["up-1"]  # suffixes match in any case
    with caplog.at_level(logging.WARNING, logger="msif_assets"):
        again = runner.register_shards(world["instance"], world["inputs"]["inbox"])
    assert list(again) == []
    for name in ("notes.csv", ".draft.jsonl", "shard-leak.jsonl"):
        assert any(name in p for p in again.problems), name
        assert any(name in r.getMessage() for r in caplog.records), name
    assert "draft" not in {r["doc_id"] for r in _sql(world, "SELECT doc_id FROM documents")}


def test_inbox_sensor_logs_ignored_files_and_sees_nothing_changed(world):
    from msif_assets.defs.sensors import inbox_sensor

    resources = {"inputs": world["defs"].resources["inputs"]}
    with dg.build_sensor_context(instance=world["instance"], resources=resources) as context:
        result = inbox_sensor(context)
    assert not result.dynamic_partitions_requests and not result.asset_events  # nothing new or changed
    assert any("notes.csv" in p for p in json.loads(result.cursor)["problems"])


def test_an_edited_shard_file_is_reingested_and_refreshed(world):
    """Runs last: edits shard-0, then `msif materialize` again, then the sensor path."""
    path = world["inbox"] / "shard-0.jsonl"
    with open(path, "ab") as fh:
        fh.write(_line({"doc_id": "s0-new", "text": "Gus was born in Lima ."}))
        fh.write(b'{"doc_id": "s0-broken", "text": \n')
    ran, refreshed, new_shards, _ = bring_up_to_date(world["config"], world["defs"], world["instance"])
    assert list(new_shards) == []
    assert {(a, "shard-0") for a in ("corpus_shards", "doc_chunks", "doc_embeddings")} <= refreshed.keys() | ran.keys()
    assert "s0-new" in _docs(world, "shard-0")
    bad = [r for r in _rejects(world, "shard-0") if r["field"] == "<line>"]
    assert len(bad) == 1 and "malformed JSON" in bad[0]["reason"] and bad[0]["line"] == len(path.read_bytes().splitlines())
    assert _sql(world, "SELECT count(*) AS n FROM chunks WHERE doc_id = 's0-new'")[0]["n"] >= 1
    # other shards' ingestion ran again only where shard-0 comes first in name order (the
    # doc_id rule), and their documents did not change, so nothing below them ran
    ran_keys = refreshed.keys() | ran.keys()
    assert ("doc_chunks", "shard-dup") not in ran_keys and ("corpus_shards", "UPPER") not in ran_keys

    # the sensor path (`dagster dev`): the observation it reports makes automation re-ingest
    with open(path, "ab") as fh:
        fh.write(_line({"doc_id": "s0-newer", "text": "Hal was born in Rome ."}))
    from msif_assets.defs.sensors import inbox_sensor

    instance = world["instance"]
    with dg.build_sensor_context(instance=instance, resources={"inputs": world["defs"].resources["inputs"]}) as context:
        result = inbox_sensor(context)
    assert [e.partition for e in result.asset_events] == ["shard-0", "shard-dup", "shard-empty", "shard-sur", "shard-u16"]
    for event in result.asset_events:  # what the sensor daemon does with them
        instance.report_runless_asset_event(event)
    cursor = runner.load_cursor(Path(world["config"].lake_root) / ".automation_cursor")
    sensed, _ = runner.refresh(world["defs"], instance, cursor)
    assert ("corpus_shards", "shard-0") in sensed.keys() and ("doc_chunks", "shard-0") in sensed.keys()
    assert "s0-newer" in _docs(world, "shard-0")
