"""`msif` errors are one line naming what failed and what to do; the traceback goes to a log file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..defs.byo_world import COMPUTE, make_world


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MSIF_CONFIG", "MSIF_LAKE")}
    return subprocess.run([sys.executable, "-m", "msif_assets.app.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_bad_setting_is_one_line_naming_file_and_key(tmp_path):
    config = tmp_path / "msif.toml"
    config.write_text('[compute]\ndevice = "tpu"\n')
    done = _run("materialize", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "msif.toml" in lines[0] and "device='tpu'" in lines[0], done.stderr
    assert not (tmp_path / "lake").exists()  # nothing ran


def test_a_failing_step_is_one_line_with_the_traceback_in_the_lake_log(tmp_path):
    inputs = make_world(tmp_path, n_shards=1)
    Path(inputs["queries"]).write_text(json.dumps({"query_id": "q1", "prompt": "Where was Ada born ? " * 40, "completion": " Paris"}) + "\n")
    lines = ["[lake]", f'root = "{tmp_path / "lake"}"', "[inputs]"] + [f'{k} = "{v}"' for k, v in inputs.items()]
    lines += ["[compute]"] + [f"{k} = {json.dumps(v)}" for k, v in COMPUTE.items()]
    (tmp_path / "msif.toml").write_text("\n".join(lines) + "\n")
    done = _run("materialize", "--config", str(tmp_path / "msif.toml"), cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "queries" in last and "q1" in last and "traceback:" in last, done.stderr[-3000:]
    log_file = Path(last.rsplit("traceback: ", 1)[1].rstrip(")"))
    if not log_file.is_absolute():
        log_file = tmp_path / log_file
    assert log_file.is_file() and "Traceback" in log_file.read_text()
    assert str(tmp_path / "lake") in str(log_file.resolve())
