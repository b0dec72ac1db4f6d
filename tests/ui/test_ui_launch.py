"""``make ui`` starts the UI without the ``SupersessionWarning`` that asks for ``dg dev``
(issue 14, item 6). The command is the Makefile's own (``make -n ui``), run on a throw-away
instance and a trivial code location, on a free local port, and stopped once it serves."""

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

from ..processes import stop_group

REPO = Path(__file__).resolve().parents[2]


def _ui_command() -> list[str]:
    lines = subprocess.run(["make", "-n", "ui"], cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    line = next(line for line in lines if " dagster dev " in f" {line} ")
    argv = shlex.split(line)
    assert argv[0].startswith("DAGSTER_HOME="), argv
    return argv[1:]


def _serve(argv: list[str], home: Path, code: Path, timeout: float = 120.0) -> str:
    """Run the launch command until it serves (or ``timeout``); its whole output."""
    argv = [a for a in argv]
    i = argv.index("-w")
    argv[i:i + 2] = ["-f", str(code)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = home / "ui.log"
    proc = subprocess.Popen(argv + ["-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(home)},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while "Serving dagster-webserver" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        return log.read_text()
    finally:
        stop_group(proc)


def test_make_ui_serves_without_the_supersession_warning(tmp_path):
    argv = _ui_command()
    assert argv[argv.index("dagster") + 1] == "dev"
    code = tmp_path / "defs.py"
    code.write_text("import dagster as dg\n\ndefs = dg.Definitions()\n")
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    output = _serve(argv, tmp_path, code)
    assert "Serving dagster-webserver" in output, output[-3000:]
    assert "SupersessionWarning" not in output and "dg dev" not in output, output[-3000:]


def test_the_filter_is_what_silences_it(tmp_path):
    """Control: the same command without the Makefile's -W filter does print the warning."""
    argv = _ui_command()
    i = argv.index("-W")
    del argv[i:i + 2]
    code = tmp_path / "defs.py"
    code.write_text("import dagster as dg\n\ndefs = dg.Definitions()\n")
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert "SupersessionWarning" in _serve(argv, tmp_path, code, timeout=60)
