"""One writer per lake, and no run left behind by a killed one.

``lake_lock`` takes an exclusive ``flock`` on ``<lake>/.msif.lock`` (for a lake on an object
store, which has no locks, on a local file named after the lake's URI: it serializes the msif
processes of one machine; across machines Dagster's run queue and pools coordinate) for the whole of a
materialization; the kernel releases it when the process dies, however it dies, so a stale
lock never outlives its holder. A second ``msif materialize`` on the same lake waits (saying
for whom) or, with ``wait=False``, stops with a message naming the holder.

``fail_orphaned_runs`` runs under the lock: every run this runner started that is still
unfinished belongs to a process that no longer runs (the lock proves it), e.g. one killed with
``kill -9``, on this host (a shared PostgreSQL instance also holds other hosts' runs). It is marked failed and its concurrency-pool slots are freed, so it never keeps
the ``msif_heavy`` pool occupied.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..lake.storage import is_remote, lake_path

log = logging.getLogger(__name__)
LOCK_NAME = ".msif.lock"
RUNNER_TAG = "msif/runner"


class LakeBusyError(RuntimeError):
    """Another msif process holds the lake's lock."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
    except (OSError, ValueError):
        return "another process"


@contextmanager
def lake_lock(lake_root: str | os.PathLike, wait: bool = True, poll_seconds: float = 1.0) -> Iterator[None]:
    root = lake_path(lake_root)
    if is_remote(root):
        path = Path(tempfile.gettempdir()) / "msif-locks" / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}{LOCK_NAME}"
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK_NAME
    with open(path, "a+") as fh:
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise LakeBusyError(f"the lake {root} is being materialized by {holder}; wait for it, or stop that process") from None
                if not told:
                    log.warning("waiting for %s, which is materializing the lake %s", holder, root)
                    told = True
                time.sleep(poll_seconds)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def fail_orphaned_runs(instance) -> list[str]:
    """Mark every unfinished run of this runner failed and free its pool slots (call under the lock)."""
    import dagster as dg

    unfinished = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                  dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=unfinished, tags={RUNNER_TAG: "cli"}))
    failed = []
    for record in records:
        run = record.dagster_run
        if run.tags.get("msif/host", socket.gethostname()) != socket.gethostname():
            continue  # another machine's run: its own msif decides whether its process lives
        pid = run.tags.get("msif/pid", "?")
        instance.report_run_failed(run, f"msif: the process that ran this (pid {pid}) is gone; marked failed by the next msif run")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    if failed:
        log.warning("marked %d run(s) of a killed msif process failed and freed their pool slots: %s", len(failed), ", ".join(failed))
    return failed
