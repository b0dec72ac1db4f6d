"""Real `msif materialize` processes on a user-brought world: a run killed with kill -9 never
blocks the next one, and two materializations of one lake are serialized by its lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from msif_assets.lake.catalog import Catalog

from ..defs.byo_world import COMPUTE, make_world

POOL = "msif_heavy"


def _config(root: Path) -> Path:
    inputs = make_world(root)
    lines = ["[lake]", f'root = "{root / "lake"}"', "[inputs]"] + [f'{k} = "{v}"' for k, v in inputs.items()]
    lines += ["[compute]"] + [f"{k} = {json.dumps(v)}" for k, v in COMPUTE.items()]
    path = root / "msif.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _msif(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "msif_assets.app.cli", "materialize", "--config", str(config), *extra]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MSIF_CONFIG", "MSIF_LAKE")}


def _instance(root: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(root / "lake" / ".dagster"))


def _running_instance(root: Path) -> dg.DagsterInstance:
    """The lake's instance, opened once the running msif process has created it (it takes the
    lake lock after): opening it while that process creates its tables would race it."""
    lock = root / "lake" / ".msif.lock"
    _wait_for(lambda: lock.exists() and lock.read_text().strip() != "", 120, "the msif process to create its instance")
    return _instance(root)


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _duplicates(root: Path) -> int:
    with Catalog.open(root / "lake") as catalog:
        return catalog.query("SELECT count(*) - count(DISTINCT (ft_model, pt_model, query_id, chunk_id, method, damping_kind, damping)) "
                             "AS d FROM influence").column("d")[0].as_py()


def test_a_run_killed_holding_the_pool_never_blocks_the_next(tmp_path):
    config = _config(tmp_path)
    proc = subprocess.Popen(_msif(config), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        instance = _running_instance(tmp_path)
        _wait_for(lambda: instance.event_log_storage.get_concurrency_info(POOL).active_slot_count > 0, 240, "a heavy step")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        held = instance.event_log_storage.get_concurrency_info(POOL).active_run_ids
        assert held, "the killed run held a pool slot"
    finally:
        proc.kill()
    done = subprocess.run(_msif(config), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    instance = _instance(tmp_path)
    assert instance.event_log_storage.get_concurrency_info(POOL).active_slot_count == 0
    for run_id in held:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert _duplicates(tmp_path) == 0
    again = subprocess.run(_msif(config), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.startswith("0 asset partitions"), again.stdout + again.stderr[-2000:]


def test_two_materializations_of_one_lake_are_serialized(tmp_path):
    config = _config(tmp_path)
    first = subprocess.Popen(_msif(config), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second_proc = None
    try:
        lock = tmp_path / "lake" / ".msif.lock"
        _wait_for(lambda: lock.exists() and lock.read_text().strip() != "", 120, "the first run to take the lock")
        # Both contenders start at once, while the first run has its whole lineage ahead of it.
        second_proc = subprocess.Popen(_msif(config), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        busy = subprocess.run(_msif(config, "--no-wait"), env=_env(), capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and f"pid {first.pid}" in busy.stderr, busy.stderr
        second_out, second_err = second_proc.communicate(timeout=600)
        second = subprocess.CompletedProcess(second_proc.args, second_proc.returncode, second_out, second_err)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
        if second_proc is not None:
            second_proc.kill()
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 0 and "waiting for" in second.stderr, second.stderr[-2000:]
    assert second.stdout.startswith("0 asset partitions"), second.stdout  # the first did all the work, once
    assert _duplicates(tmp_path) == 0


def test_sigterm_stops_a_run_and_the_next_one_finishes(tmp_path):
    config = _config(tmp_path)
    proc = subprocess.Popen(_msif(config), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        instance = _running_instance(tmp_path)
        _wait_for(lambda: instance.event_log_storage.get_concurrency_info(POOL).active_slot_count > 0, 240, "a heavy step")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    done = subprocess.run(_msif(config), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _instance(tmp_path).event_log_storage.get_concurrency_info(POOL).active_slot_count == 0
    assert _duplicates(tmp_path) == 0
