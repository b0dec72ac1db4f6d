"""Every path in the lake, in one place.

```
<root>/
  shards/<shard>/docs.parquet                         documents of one corpus shard
  chunks/shard=<shard>/part.parquet                   token chunks (hive partition)
  embeddings/                                         LanceDB database (table "chunks")
  factors/<pt|ft>/<model_hash>/factors.safetensors    EK-FAC factors of one model
  factors/<pt|ft>/<model_hash>/stats/shard=<shard>.safetensors   per-shard raw sums
  queries/queries.parquet
  query_gradients/pt=<hash>/ft=<hash>/method=<m>/damping=<tag>/block=<i>.safetensors   one query block
  query_gradients/pt=<hash>/ft=<hash>/method=<m>/damping=<tag>/blocks.json  marker: the published blocks
  candidates/shard=<shard>/part.parquet               candidate chunks per query (hive)
  scores/model=<ft_hash>/shard=<shard>/part.parquet   influence scores (hive)
  rejects/source=<name>/part.parquet                  rejected input rows (hive)
  eval/<name>.parquet                                 evaluation tables
  counterfactual/models/<key>/                        retrained models (content-addressed cache)
  counterfactual/runs/<asset>/<partition>.json        which cached model a retrain partition holds
  .staging/                                           temp dirs for atomic swaps
```

The root is a local directory or an object-store URI (``s3://bucket/prefix``; see
``lake/storage.py``): paths are then ``UPath`` objects with the same API.

Every variable path component (shard, model hash, method, damping tag, source, eval
name) is a *partition key*: ``[A-Za-z0-9._-]+``, at most 200 characters, not starting
with ``.`` and never containing ``..``. Keys are validated before a path is built, and
each built path is checked to lie inside the root, so no input can escape the lake.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .storage import LakePath, lake_path, normalized_inside

__all__ = ["LakeLayout", "PartitionKeyError", "validate_key", "Stage"]

Stage = Literal["pt", "ft"]

_KEY_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_KEY_LEN = 200


class PartitionKeyError(ValueError):
    """A shard/model/method/source key that is unsafe to use as a path component."""


def validate_key(value: object, what: str = "partition key") -> str:
    """Return ``value`` if it is a safe partition key, else raise PartitionKeyError."""
    if not isinstance(value, str):
        raise PartitionKeyError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    if not value or len(value) > _MAX_KEY_LEN or not _KEY_RE.fullmatch(value):
        raise PartitionKeyError(
            f"{what} {value!r} is not a safe partition key: use 1-{_MAX_KEY_LEN} characters "
            "from A-Z a-z 0-9 . _ - (rename the file/shard, e.g. replace spaces with '_')"
        )
    if value.startswith(".") or ".." in value:
        raise PartitionKeyError(
            f"{what} {value!r} must not start with '.' or contain '..' (hidden or parent path)"
        )
    return value


@dataclass(frozen=True)
class LakeLayout:
    """Paths of every table and file under one lake root (an absolute local path, or a UPath
    on an object store)."""

    root: LakePath

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", lake_path(root))

    @property
    def is_remote(self) -> bool:
        return not isinstance(self.root, Path)

    def _inside(self, *parts: str) -> LakePath:
        path = self.root.joinpath(*parts)
        if not normalized_inside(self.root, path):
            raise PartitionKeyError(f"path {path} escapes the lake root {self.root}")
        return path if self.is_remote else Path(os.path.normpath(path))

    # -- infrastructure -------------------------------------------------------
    @property
    def staging_dir(self) -> Path:
        """Scratch space for atomic directory swaps (same filesystem, outside globs)."""
        return self._inside(".staging")

    # -- corpus ---------------------------------------------------------------
    @property
    def shards_dir(self) -> Path:
        return self._inside("shards")

    def shard_docs_file(self, shard: str) -> Path:
        return self._inside("shards", validate_key(shard, "shard"), "docs.parquet")

    @property
    def chunks_dir(self) -> Path:
        return self._inside("chunks")

    def chunks_partition(self, shard: str) -> Path:
        return self._inside("chunks", f"shard={validate_key(shard, 'shard')}")

    def chunks_file(self, shard: str) -> Path:
        return self.chunks_partition(shard) / "part.parquet"

    @property
    def embeddings_dir(self) -> Path:
        return self._inside("embeddings")

    # -- models and factors ---------------------------------------------------
    def factors_dir(self, stage: Stage, model_hash: str) -> Path:
        if stage not in ("pt", "ft"):
            raise PartitionKeyError(f"factor stage must be 'pt' or 'ft', got {stage!r}")
        return self._inside("factors", stage, validate_key(model_hash, "model hash"))

    def factors_file(self, stage: Stage, model_hash: str, name: str = "factors") -> Path:
        return self.factors_dir(stage, model_hash) / f"{validate_key(name, 'factor file name')}.safetensors"

    def factor_stats_file(self, stage: Stage, model_hash: str, shard: str) -> Path:
        return self.factors_dir(stage, model_hash) / "stats" / f"shard={validate_key(shard, 'shard')}.safetensors"

    # -- queries and scores ---------------------------------------------------
    @property
    def queries_file(self) -> Path:
        return self._inside("queries", "queries.parquet")

    def query_gradients_dir(self, pt_model: str, ft_model: str, method: str, damping: str) -> Path:
        return self._inside(
            "query_gradients",
            f"pt={validate_key(pt_model, 'pt model hash')}",
            f"ft={validate_key(ft_model, 'ft model hash')}",
            f"method={validate_key(method, 'method')}",
            f"damping={validate_key(damping, 'damping tag')}",
        )

    def query_gradients_file(self, pt_model: str, ft_model: str, method: str, damping: str, block: int = 0) -> Path:
        if not isinstance(block, int) or block < 0:
            raise PartitionKeyError(f"query block must be an integer >= 0, got {block!r}")
        return self.query_gradients_dir(pt_model, ft_model, method, damping) / f"block={block:05d}.safetensors"

    def query_gradients_manifest(self, pt_model: str, ft_model: str, method: str, damping: str) -> LakePath:
        """The marker that publishes one score key's blocks (``pipeline/query_store.py``)."""
        return self.query_gradients_dir(pt_model, ft_model, method, damping) / "blocks.json"

    @property
    def candidates_dir(self) -> Path:
        return self._inside("candidates")

    def candidates_partition(self, shard: str) -> Path:
        return self._inside("candidates", f"shard={validate_key(shard, 'shard')}")

    def candidates_file(self, shard: str) -> Path:
        return self.candidates_partition(shard) / "part.parquet"

    @property
    def scores_dir(self) -> Path:
        return self._inside("scores")

    def scores_partition(self, ft_model: str, shard: str) -> Path:
        return self._inside(
            "scores",
            f"model={validate_key(ft_model, 'ft model hash')}",
            f"shard={validate_key(shard, 'shard')}",
        )

    def scores_file(self, ft_model: str, shard: str) -> Path:
        return self.scores_partition(ft_model, shard) / "part.parquet"

    # -- rejects and evaluation -----------------------------------------------
    @property
    def rejects_dir(self) -> Path:
        return self._inside("rejects")

    def rejects_partition(self, source: str) -> Path:
        return self._inside("rejects", f"source={validate_key(source, 'reject source')}")

    def rejects_file(self, source: str) -> Path:
        return self.rejects_partition(source) / "part.parquet"

    @property
    def eval_dir(self) -> Path:
        return self._inside("eval")

    def eval_file(self, name: str) -> Path:
        return self._inside("eval", f"{validate_key(name, 'evaluation table name')}.parquet")

    # -- counterfactual retrains (pipeline/retrain.py) --------------------------
    def counterfactual_model_dir(self, key: str) -> Path:
        return self._inside("counterfactual", "models", validate_key(key, "retrain key"))

    def counterfactual_run_file(self, asset: str, partition: str) -> Path:
        return self._inside("counterfactual", "runs", validate_key(asset, "asset name"),
                            f"{validate_key(partition, 'partition key')}.json")
