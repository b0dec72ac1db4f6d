"""The inbox scan (nothing skipped silently, nothing read from outside the inbox) and the
cross-shard doc_id rule (the shard named first keeps an id, whatever order shards arrive in)."""

import json
import os

import pytest

from msif_assets.lake import tables
from msif_assets.lake.inputs import InputError, corpus_reject_source
from msif_assets.lake.layout import LakeLayout
from msif_assets.pipeline.corpus import files_digest, inbox_versions, ingest_shard, scan_inbox


def _write(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scan_classifies_every_entry(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _write(inbox / "a.jsonl", {"doc_id": "1", "text": "x"})
    _write(inbox / "B.JSONL", {"doc_id": "2", "text": "y"})
    (inbox / "alias.jsonl").symlink_to(inbox / "a.jsonl")  # inside the inbox: read
    _write(tmp_path / "outside.jsonl", {"doc_id": "3", "text": "z"})
    (inbox / "leak.jsonl").symlink_to(tmp_path / "outside.jsonl")
    (inbox / "up.txt").symlink_to("../outside.jsonl")
    (inbox / "gone.jsonl").symlink_to(inbox / "missing.jsonl")
    (inbox / "data.csv").write_text("doc_id,text\n")
    (inbox / ".hidden.jsonl").write_text("")
    (inbox / "my shard.jsonl").write_text("")
    (inbox / "sub").mkdir()
    scan = scan_inbox(inbox)
    assert sorted(scan.shards) == ["B", "a", "alias"]
    assert sorted(scan.refused) == ["leak", "up"]
    assert all("outside the inbox" in m and "never read" in m for ms in scan.refused.values() for m in ms)
    for name in ("gone.jsonl", "data.csv", ".hidden.jsonl", "my shard.jsonl", "sub"):
        assert sum(name in p for p in scan.ignored) == 1, name
    assert len(scan.problems) == len(scan.ignored) + 2


def test_a_refused_shard_fails_naming_the_link(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "s.jsonl").symlink_to("/etc/passwd")
    with pytest.raises(InputError, match=r"s\.jsonl: is a symlink to /etc/passwd, outside the inbox"):
        ingest_shard(LakeLayout(tmp_path / "lake"), inbox, "s")
    assert not (tmp_path / "lake" / "shards").exists()


def _docs(layout, shard):
    return tables.read_docs(layout, shard).column("doc_id").to_pylist()


def _reasons(layout, shard):
    return [r["reason"] for r in tables.read_rejects(layout, corpus_reject_source(shard)).to_pylist()]


def test_the_shard_named_first_keeps_a_doc_id_whatever_the_arrival_order(tmp_path):
    inbox, layout = tmp_path / "inbox", LakeLayout(tmp_path / "lake")
    inbox.mkdir()
    _write(inbox / "m.jsonl", {"doc_id": "x", "text": "in m"}, {"doc_id": "y", "text": "in m"})
    before = inbox_versions({s: files_digest(f) for s, f in scan_inbox(inbox).shards.items()})
    ingest_shard(layout, inbox, "m")
    assert _docs(layout, "m") == ["x", "y"]

    _write(inbox / "z.jsonl", {"doc_id": "y", "text": "in z"})  # named after m: m is unaffected
    _write(inbox / "a.jsonl", {"doc_id": "x", "text": "in a"})  # named before m: m must re-check
    after = inbox_versions({s: files_digest(f) for s, f in scan_inbox(inbox).shards.items()})
    assert after["m"] != before["m"] and after["z"] != after["m"]
    for shard in ("m", "z", "a"):  # any order gives the same result
        ingest_shard(layout, inbox, shard)
    assert _docs(layout, "a") == ["x"] and _docs(layout, "m") == ["y"] and _docs(layout, "z") == []
    (reason,) = _reasons(layout, "m")
    assert "'x'" in reason and "'a'" in reason and "'m'" in reason and "a.jsonl:1" in reason
    (reason,) = _reasons(layout, "z")
    assert "'m'" in reason and "m.jsonl:2" in reason

    # a.jsonl edited after its own ingestion: m reads a's current file, not a's stale ids
    _write(inbox / "a.jsonl", {"doc_id": "other", "text": "in a"})
    os.utime(inbox / "a.jsonl", ns=(1, 1))
    ingest_shard(layout, inbox, "m")
    assert _docs(layout, "m") == ["x", "y"] and _reasons(layout, "m") == []
