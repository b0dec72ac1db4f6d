"""Preconditioned query vectors in the lake: one safetensors file per score key and query block.

A block holds the vectors of ``query_batch_size`` consecutive queries, per module either dense
(``<module>``: (Q, m, n)) or as low-rank factors (``<module>::left`` (Q, m, r) and
``<module>::right`` (Q, n, r); ``query_rank`` in the settings). Writing and scoring go block
by block, so memory holds one block's vectors, never every query's.

A score key's blocks change together: a write first deletes the key's marker ``blocks.json``
(:func:`unpublish`), writes its blocks, removes blocks left from a larger earlier write, and
then writes the marker (:func:`publish`). Readers count blocks from the marker only, so a write
killed midway leaves the key unpublished (and a clear error), never a mix of old and new blocks;
this holds on an object store too, where each block and the marker are single-object writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.lowrank import LowRankQueries
from ..lake.atomic import atomic_write_json
from ..lake.factor_store import MissingArtifactError, load_tensors, read_metadata, save_tensors
from ..lake.layout import LakeLayout
from .models import ModelIds
from .settings import ScoreKey

QueryVectors = dict[str, "torch.Tensor | LowRankQueries"]


def write_block(layout: LakeLayout, ids: ModelIds, key: ScoreKey, block: int, vectors: QueryVectors, query_ids: list[str]) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for name, v in vectors.items():
        if isinstance(v, LowRankQueries):
            tensors[f"{name}::left"], tensors[f"{name}::right"] = v.left, v.right
        else:
            tensors[name] = v
    meta = {"method": key.method, "damping": key.tag, "block": str(block), "query_ids": json.dumps(query_ids),
            "pt_model": ids.pt, "ft_model": ids.ft}
    return save_tensors(layout.query_gradients_file(ids.pt, ids.ft, key.method, key.tag, block), tensors, meta)


def read_block(layout: LakeLayout, ids: ModelIds, key: ScoreKey, block: int) -> QueryVectors:
    tensors, _ = load_tensors(layout.query_gradients_file(ids.pt, ids.ft, key.method, key.tag, block))
    out: QueryVectors = {}
    for name, t in tensors.items():
        module, _, part = name.rpartition("::")
        if part == "left":
            out[module] = LowRankQueries(t, tensors[f"{module}::right"])
        elif part != "right":
            out[name] = t
    return out


def unpublish(layout: LakeLayout, ids: ModelIds, key: ScoreKey) -> None:
    """Withdraw ``key``'s blocks before they are rewritten."""
    layout.query_gradients_manifest(ids.pt, ids.ft, key.method, key.tag).unlink(missing_ok=True)


def publish(layout: LakeLayout, ids: ModelIds, key: ScoreKey, n_blocks: int, n_queries: int) -> None:
    """Publish the ``n_blocks`` just written (after removing any beyond them)."""
    _prune_blocks(layout, ids, key, n_blocks)
    atomic_write_json(layout.query_gradients_manifest(ids.pt, ids.ft, key.method, key.tag),
                      {"blocks": n_blocks, "queries": n_queries, "method": key.method, "damping": key.tag})


def block_count(layout: LakeLayout, ids: ModelIds, key: ScoreKey) -> int:
    """How many blocks the last completed write of ``key`` published."""
    manifest = layout.query_gradients_manifest(ids.pt, ids.ft, key.method, key.tag)
    if not manifest.is_file():
        raise MissingArtifactError(f"no published query gradients for {key.method}@{key.tag} at {manifest.parent} "
                                   "(never written, or a write was interrupted): materialize query_gradients")
    return int(json.loads(manifest.read_text())["blocks"])


def block_query_ids(layout: LakeLayout, ids: ModelIds, key: ScoreKey, block: int) -> list[str]:
    return json.loads(read_metadata(layout.query_gradients_file(ids.pt, ids.ft, key.method, key.tag, block))["query_ids"])


def _prune_blocks(layout: LakeLayout, ids: ModelIds, key: ScoreKey, keep: int) -> None:
    """Remove blocks a larger earlier write left beyond the ``keep`` just written."""
    folder = layout.query_gradients_dir(ids.pt, ids.ft, key.method, key.tag)
    for path in sorted(folder.glob("block=*.safetensors")):
        if int(path.stem.split("=")[1]) >= keep:
            path.unlink()
