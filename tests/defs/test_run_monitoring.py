"""Run monitoring marks a run whose process was killed as failed (issue 14, item 5).

Two real runs execute in subprocesses on an instance configured by the repository's
``dagster_home/dagster.yaml``; one is killed with SIGKILL, the other keeps running. The real
``dagster-daemon run`` (its run-monitoring daemon) then marks the killed run FAILURE and
leaves the live one STARTED. With Dagster's DefaultRunLauncher the killed run would stay
STARTED: that launcher cannot report a worker's health to run monitoring."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from ..processes import stop_group

from msif_assets.defs.run_launcher import PidCheckingRunLauncher, _process_start_time, process_state

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

SLOW_DEFS = '''
import os, sys, time
from pathlib import Path
import dagster as dg

@dg.asset
def slow(context) -> None:
    Path(os.environ["MSIF_TEST_MARKER"]).write_text(str(os.getpid()))
    time.sleep(600)

defs = dg.Definitions(assets=[slow])

if __name__ == "__main__":
    dg.materialize([slow], instance=dg.DagsterInstance.get())
'''


def _start_run(home: Path, work: Path, name: str) -> tuple[subprocess.Popen, Path]:
    marker = work / f"{name}.started"
    env = {**os.environ, "DAGSTER_HOME": str(home), "MSIF_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, str(work / "slow_defs.py")], env=env, cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, f"the run process {name} exited early ({proc.returncode})"
        assert time.monotonic() < deadline, f"the run {name} did not start"
        time.sleep(0.2)
    return proc, marker


def _run_of(instance: dg.DagsterInstance, pid: int) -> dg.DagsterRun:
    for record in instance.get_run_records():
        logs = instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        if any(f"(pid: {pid})" in (e.message or "") for e in logs):
            return record.dagster_run
    raise AssertionError(f"no run recorded pid {pid}")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    (tmp_path / "slow_defs.py").write_text(SLOW_DEFS)
    return home


def test_the_repository_instance_uses_a_launcher_that_run_monitoring_can_ask(home):
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_enabled
        assert isinstance(instance.run_launcher, PidCheckingRunLauncher)
        assert instance.run_launcher.supports_check_run_worker_health
        assert instance.run_monitoring_max_resume_run_attempts == 0  # it cannot resume: fail instead


def test_process_state_tells_a_dead_process_from_a_live_one():
    assert process_state(os.getpid()) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_state(child.pid) == "gone"
    started = _process_start_time(os.getpid())
    assert started is not None and abs(started - time.time()) < 24 * 3600
    assert process_state(os.getpid(), since=time.time()) is None  # recorded while this process ran
    assert process_state(os.getpid(), since=started - 60) == "reused"  # this process started after the pid was recorded


def test_a_killed_run_is_marked_failed_by_the_monitoring_daemon(home, tmp_path):
    killed, killed_marker = _start_run(home, tmp_path, "killed")
    alive, _ = _start_run(home, tmp_path, "alive")
    daemon = None
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            killed_run = _run_of(instance, int(killed_marker.read_text()))
            alive_run = _run_of(instance, alive.pid)
            _kill(killed)
            assert instance.get_run_by_id(killed_run.run_id).status == dg.DagsterRunStatus.STARTED  # what the issue saw
            health = instance.run_launcher.check_run_worker_health(killed_run)
            assert health.status.value == "FAILED" and "gone" in health.msg

            daemon = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-f", str(tmp_path / "slow_defs.py")],
                env={**os.environ, "DAGSTER_HOME": str(home)}, cwd=tmp_path, start_new_session=True,
                stdout=open(tmp_path / "daemon.log", "w"), stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 150
            while instance.get_run_by_id(killed_run.run_id).status != dg.DagsterRunStatus.FAILURE:
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the killed run was not marked failed:\n" + (tmp_path / "daemon.log").read_text()[-3000:]
                time.sleep(1)
            messages = [e.message or "" for e in instance.all_logs(killed_run.run_id)]
            assert any("is gone" in m for m in messages), messages[-5:]
            time.sleep(3)  # the same monitoring pass checked the live run too
            assert instance.get_run_by_id(alive_run.run_id).status == dg.DagsterRunStatus.STARTED
    finally:
        if daemon is not None:
            stop_group(daemon)
        _kill(alive)
        _kill(killed)
