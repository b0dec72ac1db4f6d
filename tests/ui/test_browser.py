"""The Dagster UI in a real browser (issue 14, item 7): headless Chromium (Debian's package,
driven by Playwright) against ``dagster-webserver`` serving a tiny user-brought world.

The lineage renders its asset nodes, an asset is materialized by clicking its "Materialize"
button and the run succeeds, and the ``refresh_all`` job is listed. The test installs what
it lacks (``apt-get install chromium``, ``pip install playwright``) and skips, saying why,
only when that is impossible. The webserver runs without the daemon (so no sensor starts
automation runs behind the test's back); the instance is the repository's ``dagster.yaml``
with the default run coordinator, so a launched run starts at once instead of waiting in a
queue for the daemon.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from ..processes import stop_group

from tests.defs.byo_world import COMPUTE, make_world

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"


def _ensure_chromium() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be: no apt-get, or not root and no sudo (.ci/run installs it)")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(sudo + command, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            pytest.skip(f"chromium could not be installed ({' '.join(command)}: {done.stderr.strip()[-300:]})")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"apt-get installed chromium, but {CHROMIUM} is missing")
    return CHROMIUM


def _ensure_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"playwright could not be installed: {done.stderr.strip()[-300:]}")
        from playwright.sync_api import sync_playwright
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dagster-webserver exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"dagster-webserver did not serve within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    chromium, sync_playwright = _ensure_chromium(), _ensure_playwright()
    root = tmp_path_factory.mktemp("ui")
    inputs = make_world(root / "world")
    config = root / "msif.toml"
    config.write_text(
        f'[lake]\nroot = "{root / "lake"}"\n[inputs]\n' + "".join(f'{k} = "{v}"\n' for k, v in inputs.items())
        + "[compute]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in COMPUTE.items())
    )
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text()
                                       + "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "webserver.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "msif_assets.definitions"],
        env={**os.environ, "DAGSTER_HOME": str(home), "MSIF_CONFIG": str(config)}, cwd=root,
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_until_serving(url, proc, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                yield {"url": url, "home": home, "browser": browser, "shots": root, "log": log}
            finally:
                browser.close()
    finally:
        stop_group(proc)


def _open(server, path: str):
    page = server["browser"].new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(server["url"] + path, wait_until="networkidle")
    skip = page.get_by_role("button", name="Skip")  # the first visit's "Join the Dagster community" dialog
    if skip.count():
        skip.first.click()
    return page


def test_the_lineage_renders_its_asset_nodes(server):
    page = _open(server, "/assets/influence_scores?view=lineage")
    try:
        for name in ("queries", "query_gradients", "candidates", "doc_chunks", "influence_scores", "fact_tracing_eval"):
            page.get_by_text(name, exact=True).first.wait_for(state="visible")
        page.goto(server["url"] + "/asset-groups", wait_until="networkidle")
        for group in ("corpus", "factors", "queries", "influence", "evaluation", "inputs"):
            page.get_by_text(group, exact=True).first.wait_for(state="visible")
    finally:
        page.screenshot(path=str(server["shots"] / "lineage.png"))
        page.close()


def test_an_asset_materialized_by_a_click_succeeds(server):
    page = _open(server, "/assets/queries")
    try:
        page.get_by_text("Never materialized").first.wait_for(state="visible")
        page.get_by_role("button", name="Materialize").first.click()  # the asset page has one (and its dropdown)
        page.get_by_text("Launched run").first.wait_for(state="visible")
        with dg.DagsterInstance.from_config(str(server["home"])) as instance:
            deadline = time.monotonic() + 300
            while True:
                run = next((r for r in instance.get_runs() if r.asset_selection and dg.AssetKey("queries") in r.asset_selection), None)
                if run is not None and run.is_finished:
                    break
                assert time.monotonic() < deadline, "the launched run did not finish:\n" + server["log"].read_text()[-3000:]
                time.sleep(1)
            assert run.status == dg.DagsterRunStatus.SUCCESS, [e.message for e in instance.all_logs(run.run_id)][-10:]
        page.reload(wait_until="networkidle")
        page.get_by_text("generated_completions").first.wait_for(state="visible")  # the materialization's metadata
        assert page.get_by_text("Never materialized").count() == 0
        page.goto(server["url"] + "/runs", wait_until="networkidle")
        page.get_by_text("Success", exact=True).first.wait_for(state="visible")
    finally:
        page.screenshot(path=str(server["shots"] / "materialized.png"))
        page.close()


def test_the_refresh_all_job_is_offered(server):
    page = _open(server, "/jobs")
    try:
        page.get_by_text("refresh_all", exact=True).first.wait_for(state="visible")
    finally:
        page.close()
