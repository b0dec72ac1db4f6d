"""Read and write a ``World`` as plain files that the rest of msif ingests.

Layout of a world directory::

    corpus/shard-00.jsonl ...  {"doc_id", "text", "kind", "shard", "facts": [[entity_id, relation], ...]}
    finetune.jsonl             {"prompt", "completion", "entity_id", "relation"}
    queries.jsonl              {"query_id", "prompt", "completion", "entity_id", "relation"}
    gold.jsonl                 {"query_id", "doc_id"}   one row per (query, gold document)
    world.json                 {"format_version", "config", "entities": [...]}

Every file is written atomically; ``world.json`` is written last and marks a complete world.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from msif_assets.lake.atomic import atomic_write_json, atomic_write_jsonl
from msif_assets.demo.world import DOC_KINDS, Document, Entity, QAPair, World, WorldConfig

FORMAT_VERSION = 1


def shard_filename(shard: int) -> str:
    return f"shard-{shard:02d}.jsonl"


def save_world(world: World, directory: str | os.PathLike) -> Path:
    """Write ``world`` under ``directory`` (created if needed) and return the directory."""
    root = Path(directory)
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    keep = set()
    for shard in range(world.config.n_shards):
        keep.add(shard_filename(shard))
        atomic_write_jsonl(corpus / shard_filename(shard), (
            {"doc_id": d.doc_id, "text": d.text, "kind": d.kind, "shard": d.shard,
             "facts": [list(f) for f in d.facts]}
            for d in world.shard_documents(shard)
        ))
    for stale in corpus.glob("shard-*.jsonl"):
        if stale.name not in keep:
            stale.unlink()
    atomic_write_jsonl(root / "finetune.jsonl", (
        {"prompt": q.prompt, "completion": q.completion, "entity_id": q.entity_id, "relation": q.relation}
        for q in world.finetune
    ))
    atomic_write_jsonl(root / "queries.jsonl", (
        {"query_id": q.query_id, "prompt": q.prompt, "completion": q.completion,
         "entity_id": q.entity_id, "relation": q.relation}
        for q in world.queries
    ))
    atomic_write_jsonl(root / "gold.jsonl", ({"query_id": q, "doc_id": d} for q, d in world.gold))
    atomic_write_json(root / "world.json", {
        "format_version": FORMAT_VERSION,
        "config": world.config.to_dict(),
        "entities": [
            {"entity_id": e.entity_id, "first_name": e.first_name, "last_name": e.last_name,
             "name": e.name, "split": e.split, "facts": dict(e.facts)}
            for e in world.entities
        ],
    })
    return root


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; re-create the world with save_world()")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or regenerate the file") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; each line needs {list(required)}")
            rows.append(row)
    return rows


def _entity(path: Path, i: int, d: dict, cfg: WorldConfig) -> Entity:
    try:
        facts = tuple((r, d["facts"][r]) for r in cfg.relations)
        return Entity(d["entity_id"], d["first_name"], d["last_name"], d["split"], facts)
    except KeyError as exc:
        raise ValueError(f"{path}: entities[{i}] lacks field {exc.args[0]!r}") from exc


def load_world(directory: str | os.PathLike) -> World:
    """Read a world written by ``save_world``; raises ``ValueError`` naming the bad file/line/field."""
    root = Path(directory)
    meta_path = root / "world.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing, so {root} holds no complete world; run save_world()")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    cfg = WorldConfig.from_dict(meta["config"])
    entities = tuple(_entity(meta_path, i, d, cfg) for i, d in enumerate(meta["entities"]))

    documents = []
    for shard in range(cfg.n_shards):
        path = root / "corpus" / shard_filename(shard)
        for row in _read_jsonl(path, ("doc_id", "text", "kind", "facts")):
            if row["kind"] not in DOC_KINDS:
                raise ValueError(f"{path}: doc {row['doc_id']!r} has kind {row['kind']!r}, not one of {DOC_KINDS}")
            facts = tuple((str(e), str(r)) for e, r in row["facts"])
            documents.append(Document(row["doc_id"], row["text"], row["kind"], int(row.get("shard", shard)), facts))
    documents.sort(key=lambda d: d.doc_id)

    qa_fields = ("prompt", "completion", "entity_id", "relation")
    finetune = tuple(
        QAPair(r["prompt"], r["completion"], r["entity_id"], r["relation"])
        for r in _read_jsonl(root / "finetune.jsonl", qa_fields)
    )
    queries = tuple(
        QAPair(r["prompt"], r["completion"], r["entity_id"], r["relation"], query_id=r["query_id"])
        for r in _read_jsonl(root / "queries.jsonl", ("query_id", *qa_fields))
    )
    gold = tuple(sorted((r["query_id"], r["doc_id"]) for r in _read_jsonl(root / "gold.jsonl", ("query_id", "doc_id"))))
    return World(cfg, entities, tuple(documents), finetune, queries, gold)
