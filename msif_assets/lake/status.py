"""A summary of what the lake holds: one row per table/file group.

``lake_status(root)`` returns TableStatus rows: name, rows (None where counting does
not apply), partitions (partition keys such as ``shard=a`` or file names) and path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from msif_assets.lake.catalog import BASE_VIEWS, Catalog
from msif_assets.lake.layout import LakeLayout
from msif_assets.lake.tables import list_partitions, list_shards

__all__ = ["TableStatus", "lake_status"]


@dataclass(frozen=True)
class TableStatus:
    name: str
    rows: int | None
    partitions: list[str] = field(default_factory=list)
    path: str = ""


def _hive(table_dir: Path) -> list[str]:
    return ["/".join(f"{k}={v}" for k, v in part.items()) for part in list_partitions(table_dir)]


def _files(folder: Path, pattern: str) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.glob(pattern) if p.is_file())


def lake_status(root: str | os.PathLike[str], sql_dir: str | os.PathLike[str] | None = None) -> list[TableStatus]:
    layout = LakeLayout(root)
    with Catalog.open(layout.root, sql_dir) as catalog:
        counts = {name: int(catalog.query(f"SELECT count(*) AS n FROM {name}").column("n")[0].as_py())
                  for name in BASE_VIEWS}
    partitions = {
        "documents": [f"shard={s}" for s in list_shards(layout)],
        "chunks": _hive(layout.chunks_dir),
        "influence": _hive(layout.scores_dir),
        "rejects": _hive(layout.rejects_dir),
    }
    paths = {"documents": layout.shards_dir, "chunks": layout.chunks_dir, "queries": layout.queries_file,
             "candidates": layout.candidates_dir, "influence": layout.scores_dir,
             "rejects": layout.rejects_dir}
    out = [TableStatus(name, counts[name], partitions.get(name, []),
                       str(paths.get(name, layout.eval_dir))) for name in BASE_VIEWS]
    embeddings = None
    if layout.embeddings_dir.is_dir():
        from msif_assets.lake.vectors import ChunkVectorStore

        store = ChunkVectorStore(layout.embeddings_dir)
        embeddings = TableStatus("embeddings", store.count(), [f"shard={s}" for s in store.shards()],
                                 str(layout.embeddings_dir))
    out.append(embeddings or TableStatus("embeddings", 0, [], str(layout.embeddings_dir)))
    factors = layout.root / "factors"
    out.append(TableStatus("factors", None, _files(factors, "*/*/**/*.safetensors"), str(factors)))
    grads = layout.root / "query_gradients"
    out.append(TableStatus("query_gradients", None, _files(grads, "**/*.safetensors"), str(grads)))
    return out
