"""When assets refresh by themselves: only when a dependency's *data* changed, or the
settings the asset reads changed (its code version).

Every asset reports a content-hash data version, so a re-run that produces identical output
(e.g. ``queries`` after a fine-tune change, when every completion was given) stops the
cascade there. New shard partitions materialize because they are newly missing.

Each asset depends only on its nearest upstream (``query_gradients`` reads the model
directories, but depends on the factors made from them), so a change propagates strictly in
dependency order, one tick per step, and nothing runs against half-refreshed inputs.
"""


import hashlib
import json
from pathlib import Path
from typing import Iterable

import dagster as dg
import pyarrow as pa

from ..lake.storage import as_lake_path

HEAVY_POOL = "msif_heavy"  # factors, gradients and scores share one device


def refresh_on_change() -> dg.AutomationCondition:
    dep_changed = dg.AutomationCondition.any_deps_match(
        dg.AutomationCondition.data_version_changed() & ~dg.AutomationCondition.executed_with_root_target()
    ).with_label("any_dep_data_changed")
    return (
        (dg.AutomationCondition.newly_missing() | dep_changed | dg.AutomationCondition.code_version_changed()).since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("refresh_on_change")


def table_version(table: pa.Table, ignore: Iterable[str] = ()) -> dg.DataVersion:
    """Content hash of a table (row order included), ignoring volatile columns."""
    keep = [c for c in table.column_names if c not in set(ignore)]
    digest = hashlib.sha256()
    for batch in table.select(keep).to_batches():
        digest.update(json.dumps(batch.to_pylist(), sort_keys=True, default=str).encode())
    digest.update(str(table.num_rows).encode())
    return dg.DataVersion(digest.hexdigest()[:24])


def files_version(paths: Iterable[Path]) -> dg.DataVersion:
    digest = hashlib.sha256()
    for path in sorted((as_lake_path(p) for p in paths), key=str):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return dg.DataVersion(digest.hexdigest()[:24])


def safetensors_version(*paths: Path) -> dg.DataVersion:
    """Content hash of safetensors files: tensors and metadata in sorted order (the file's
    header order is not deterministic, so its bytes are not a content address), read one
    tensor at a time (a factor file of a 410M model is ~10 GB)."""
    from ..lake.factor_store import update_content_digest

    digest = hashlib.sha256()
    for path in paths:
        update_content_digest(digest, path)
    return dg.DataVersion(digest.hexdigest()[:24])


def text_version(*parts: str) -> dg.DataVersion:
    return dg.DataVersion(hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24])
