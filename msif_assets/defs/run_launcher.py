"""A run launcher whose runs Dagster's run monitoring can check: a run whose process died is
marked failed, instead of staying "Started" for ever.

Dagster's ``DefaultRunLauncher`` (what ``dagster dev`` uses) launches each run in a worker
process of the code server, but it does not support ``check_run_worker_health``, so for a
started run the monitoring daemon can only apply ``max_runtime_seconds``. The code server
notices a worker that died while the code server itself lives; when both die (``dagster dev``
killed or crashed, the machine put to sleep mid-run), nothing does. Runs of ``msif
materialize`` execute in the CLI process and have the same problem until the next ``msif`` run.

``PidCheckingRunLauncher`` launches exactly as the default one and reports a run's worker
health from the process that executes it: the pid that Dagster records in the run's first
engine event that has one ("Started process for run (pid: …)" for a launched run, "Executing
steps in process (pid: …)" for an in-process one). A run whose process is gone, a zombie, or a
newer process that reuses the pid, is reported FAILED, and the monitoring daemon
(``run_monitoring`` in ``dagster_home/dagster.yaml``) marks the run failed and frees its pool
slots. A run with no recorded pid yet is reported RUNNING (no evidence either way). Runs
execute on this machine (``dagster dev``, ``msif``), so their pids are local.
"""

import os
import time
from pathlib import Path

from dagster._core.events import DagsterEventType
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher

_PID_EVENTS_READ = 20  # a run's pid is in its first engine events


def run_worker_pid(instance, run_id: str) -> tuple[int, float] | None:
    """(pid, timestamp) of the first engine event of the run that records a pid."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=_PID_EVENTS_READ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.event_specific_data if event else None
        metadata = getattr(data, "metadata", None) or {}
        pid = metadata.get("pid")
        value = getattr(pid, "value", getattr(pid, "text", pid))
        if value is not None and str(value).isdigit():
            return int(value), record.event_log_entry.timestamp
    return None


def _process_start_time(pid: int) -> float | None:
    """Seconds since the epoch at which ``pid`` started (Linux ``/proc``), or None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def process_state(pid: int, since: float | None = None) -> str | None:
    """Why ``pid`` no longer runs the run (``"gone"``, ``"zombie"``, ``"reused"``), or None
    when it still does. ``since``: when the run recorded the pid (a process started after it
    merely reuses the number)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # alive, another user's
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return "zombie"
    except (OSError, IndexError):
        pass
    started = _process_start_time(pid)
    if since is not None and started is not None and started > since + 2.0:
        return "reused"
    return None


class PidCheckingRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` plus a worker health check by pid, for run monitoring."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        found = run_worker_pid(self._instance, run.run_id)
        if found is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no process recorded for this run yet")
        pid, since = found
        why = process_state(pid, since)
        if why is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"process {pid} is running", run_worker_id=str(pid))
        ago = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"the process that ran this run (pid {pid}, since {ago}) is {why}", run_worker_id=str(pid),
        )
