"""Run the lineage in-process: a full materialization, or the refresh loop the automation
daemon would run (observe inputs → evaluate conditions → execute what they request).

Requests are executed in dependency order; all partitioned assets ready together run in one
Dagster run per shard, so every run shows up in the UI (``dagster dev``) like a daemon's.
"""


import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import dagster as dg
from dagster._core.definitions.observe import observe
from dagster._serdes import deserialize_value, serialize_value

from ..pipeline.corpus import scan_inbox
from ..defs.corpus import SHARDS, record_inbox_observations
from ..defs.inputs import SOURCES

log = logging.getLogger(__name__)
Requests = dict[dg.AssetKey, set[str | None]]


@dataclass
class RunLog:
    """What ran: ``(asset key, partition or None)`` pairs, in execution order, and timings.
    ``deferred``: requests whose step found an upstream file of the current models not yet
    written (``MissingArtifactError``); they are retried once the refresh has run upstream."""

    executed: list[tuple[str, str | None]] = field(default_factory=list)
    runs: int = 0
    seconds: float = 0.0
    deferred: dict[dg.AssetKey, set[str | None]] = field(default_factory=dict)

    def keys(self) -> set[tuple[str, str | None]]:
        return set(self.executed)


class NewShards(list):
    """The shards :func:`register_shards` added (a list), with ``problems``: one message per
    inbox entry not read (ignored suffix, hidden file, outside the inbox), each logged."""

    problems: list[str]


def register_shards(instance: dg.DagsterInstance, inbox: str | Path) -> NewShards:
    """Add a shard partition for every inbox file not yet known and observe its content (what
    the inbox sensor does); every inbox entry not read is logged as a warning."""
    scan = scan_inbox(inbox)
    for problem in scan.problems:
        log.warning("inbox: %s", problem)
    known = set(instance.get_dynamic_partitions(SHARDS.name))
    new = NewShards(sorted(set(scan.shards) - known))
    new.problems = scan.problems
    if new:
        instance.add_dynamic_partitions(SHARDS.name, new)
    record_inbox_observations(instance, inbox, scan)
    return new


def _quiet_console() -> dict:
    """Run config for Dagster's console logger: WARNING by default (every event still goes to
    the instance's event log and the UI); ``MSIF_RUN_LOG_LEVEL=DEBUG`` shows them all."""
    level = os.environ.get("MSIF_RUN_LOG_LEVEL", "WARNING").upper()
    return {"loggers": {"console": {"config": {"log_level": level}}}}


def observe_inputs(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    observe(SOURCES, instance=instance, resources=defs.resources, run_config=_quiet_console())
    # the known shards' inbox files too: an edited shard file is a new data version
    record_inbox_observations(instance, defs.resources["inputs"].path("inbox"))


def _graph(defs: dg.Definitions):
    return defs.resolve_asset_graph()


def all_requests(defs: dg.Definitions, instance: dg.DagsterInstance, keys: list[dg.AssetKey] | None = None) -> Requests:
    """Every partition of every materializable asset (or of ``keys``)."""
    graph = _graph(defs)
    shards = instance.get_dynamic_partitions(SHARDS.name)
    out: Requests = {}
    for key in keys or graph.materializable_asset_keys:
        node = graph.get(key)
        out[key] = set(shards) if node.partitions_def is not None else {None}
    return out


def execute(defs: dg.Definitions, instance: dg.DagsterInstance, requests: Requests, run_log: RunLog | None = None) -> RunLog:
    """Materialize ``requests`` in dependency order, one run at a time."""
    run_log = run_log or RunLog()
    assets = list(defs.assets or []) + list(defs.asset_checks or [])
    started = time.perf_counter()
    for runs in levels(_graph(defs), requests):
        for keys, partition in runs:
            _run(assets, defs, instance, keys, partition, run_log)
    run_log.seconds += time.perf_counter() - started
    return run_log


Level = list[tuple[list[dg.AssetKey], "str | None"]]


def levels(graph, requests: Requests) -> Iterator[Level]:
    """The requested assets in dependency order, as levels of runs ``(keys, partition)``: every
    ready unpartitioned asset in one run; then every ready partitioned asset together, one run
    per partition. The runs of one level depend on none of each other (cluster.py runs them side
    by side); a level is yielded once everything it needs was yielded before it."""
    remaining = {k for k, parts in requests.items() if parts}
    done: set[dg.AssetKey] = set()

    def deps_done(key, batch=frozenset()):
        return all(p in done or p in batch or p not in remaining for p in graph.get(key).parent_keys)

    while remaining:
        unpartitioned = sorted((k for k in remaining if graph.get(k).partitions_def is None and deps_done(k)), key=str)
        if unpartitioned:
            yield [(unpartitioned, None)]
            done |= set(unpartitioned)
            remaining -= set(unpartitioned)
            continue
        batch: set[dg.AssetKey] = set()
        grew = True
        while grew:
            grew = False
            for key in remaining - batch:
                if graph.get(key).partitions_def is not None and deps_done(key, frozenset(batch)):
                    batch.add(key)
                    grew = True
        if not batch:
            raise RuntimeError(f"cannot order the requested assets: {sorted(map(str, remaining))}")
        by_partition: dict[str, list[dg.AssetKey]] = defaultdict(list)
        for key in batch:
            for partition in requests[key]:
                by_partition[partition].append(key)
        yield [(sorted(by_partition[p], key=str), p) for p in sorted(by_partition)]
        done |= batch
        remaining -= batch


def _run(assets, defs, instance, keys, partition, run_log: RunLog) -> None:
    label = ", ".join(k.to_user_string() for k in keys)
    log.info("materializing %s%s", label, f" [{partition}]" if partition else "")
    result = dg.materialize(
        assets, selection=dg.AssetSelection.assets(*keys), partition_key=partition, instance=instance, resources=defs.resources,
        tags={"msif/runner": "cli", "msif/pid": str(os.getpid()), "msif/host": socket.gethostname()}, run_config=_quiet_console(), raise_on_error=False,
    )
    errors = [] if result.success else ([_root_error(e.step_failure_data.error) for e in result.get_step_failure_events()]
                                        or [("RunFailure", "see the run's event log")])
    record_run(run_log, keys, partition, result.run_id, {e.asset_key for e in result.get_asset_materialization_events()}, errors)


def record_run(run_log: RunLog, keys, partition, run_id: str, done: set, errors: list[tuple[str, str]]) -> None:
    """Log what a run materialized; with ``errors`` (``(exception class, message)`` per failed step),
    defer the keys of a run whose steps only found an upstream file missing, raise on anything else."""
    label = ", ".join(k.to_user_string() for k in keys)
    run_log.runs += 1
    run_log.executed += [(k.to_user_string(), partition) for k in keys if k in done]
    for key in done:
        run_log.deferred.get(key, set()).discard(partition)
    if not errors:
        return
    if any(cls == "DagsterExecutionInterruptedError" for cls, _ in errors):
        raise KeyboardInterrupt
    if errors and all(cls == "MissingArtifactError" for cls, _ in errors):
        for key in set(keys) - done:
            run_log.deferred.setdefault(key, set()).add(partition)
        log.info("deferred %s%s until its upstream is refreshed", label, f" [{partition}]" if partition else "")
        return
    reason = "; ".join(f"{cls}: {message}" for cls, message in errors) or "see the run's event log"
    raise RuntimeError(f"run {run_id} failed for {label}{f' [{partition}]' if partition else ''}: {reason}")


def _root_error(error) -> tuple[str, str]:
    """The user code's exception behind Dagster's step-execution wrapper."""
    while error is not None and error.cause is not None:
        error = error.cause
    return (error.cls_name or "Error", error.message.strip().splitlines()[-1]) if error else ("Error", "")


def retry_deferred(defs: dg.Definitions, instance: dg.DagsterInstance, run_log: RunLog) -> None:
    """Run the deferred requests again now that upstream has settled; a second miss is an error."""
    pending = {k: v for k, v in run_log.deferred.items() if v}
    run_log.deferred = {}
    if not pending:
        return
    retry = execute(defs, instance, pending, RunLog())
    if any(retry.deferred.values()):
        raise RuntimeError(f"steps still miss their upstream files after a full refresh: {retry.deferred}")
    run_log.executed += retry.executed
    run_log.runs += retry.runs


def automation_tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor) -> tuple[Requests, object]:
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    requests = {key: set(result.get_requested_partitions(key)) for key in result._requested_partitions_by_asset_key}
    return {k: v for k, v in requests.items() if v}, result.cursor


def refresh(defs: dg.Definitions, instance: dg.DagsterInstance, cursor, max_ticks: int = 25,
            run_log: RunLog | None = None) -> tuple[RunLog, object]:
    """Tick the automation conditions and execute what they request, until nothing is."""
    run_log = run_log or RunLog()
    for _ in range(max_ticks):
        requests, cursor = automation_tick(defs, instance, cursor)
        if not requests:
            pending = {k: v for k, v in run_log.deferred.items() if v}
            if not pending:
                return run_log, cursor
            retry_deferred(defs, instance, run_log)
            continue
        execute(defs, instance, requests, run_log)
    raise RuntimeError(f"automation still requesting after {max_ticks} ticks: {run_log.executed[-10:]}")


def load_cursor(path: Path):
    return deserialize_value(path.read_text()) if path.exists() else None


def save_cursor(path: Path, cursor) -> None:
    from ..lake.atomic import atomic_write_text

    atomic_write_text(path, serialize_value(cursor))
