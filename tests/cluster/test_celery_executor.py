"""The lineage on real Celery workers (dagster-celery, Redis broker): `msif materialize
--executor celery` against worker processes started with `msif worker`.

- The scores equal a local in-process run's on the same world.
- Steps run on both GPU workers; heavy steps go to the `gpu` queue only: a third worker that
  listens to the default queue alone never runs one.
- A worker killed with SIGKILL in the middle of a heavy step loses nothing: its task goes back
  to the broker and another worker runs it; the lake equals the local one, without duplicates.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest

from msif_assets.app.cluster import steps_by_worker, worker_command
from msif_assets.defs.executors import GPU_QUEUE, HEAVY_OP_TAGS, QUEUE_TAG, CelerySettings
from msif_assets.lake.catalog import Catalog

from ..defs.byo_world import COMPUTE, make_world
from ..processes import stop_group
from ..servers import RedisServer

SHARDS = 3
VISIBILITY_TIMEOUT = 20  # s: a dead worker's task goes back to the broker after this (every step here is far shorter)
HEAVY = {"doc_embeddings", "pt_covariance", "pt_eigenbasis", "pt_lambda", "pt_factors", "ft_factors", "query_gradients",
         "influence_scores"}
SCORE_COLUMNS = "query_id, chunk_id, shard, method, damping_kind, damping, rank, score"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("DAGSTER_HOME", "MSIF_CONFIG", "MSIF_LAKE", "MSIF_EXECUTOR", "MSIF_CELERY_BROKER", "MSIF_CELERY_BACKEND")}


def _write_config(root: Path, inputs: dict[str, str], lake: Path | str) -> Path:
    lines = ["[lake]", f'root = "{lake}"', "[inputs]"] + [f'{k} = "{v}"' for k, v in inputs.items()]
    lines += ["[compute]"] + [f"{k} = {json.dumps(v)}" for k, v in COMPUTE.items()]
    path = root / f"{str(lake).rstrip('/').rsplit('/', 1)[-1]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _home(path: Path, heavy_slots: int) -> Path:
    """A Dagster home whose msif_heavy pool admits one heavy step per GPU worker."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(
        f"telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: {heavy_slots}\n    granularity: op\n")
    return path


def _scores(lake: Path | str) -> list[tuple]:
    with Catalog.open(lake) as catalog:
        return [tuple(r.values()) for r in catalog.query(
            f"SELECT {SCORE_COLUMNS} FROM influence ORDER BY query_id, shard, chunk_id, method, damping_kind, damping").to_pylist()]


def _duplicates(lake: Path | str) -> int:
    with Catalog.open(lake) as catalog:
        return catalog.query("SELECT count(*) - count(DISTINCT (ft_model, pt_model, query_id, chunk_id, method, damping_kind, damping)) "
                             "AS d FROM influence").column("d")[0].as_py()


def _assert_same_scores(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g[:-1] == w[:-1]
        assert math.isclose(g[-1], w[-1], rel_tol=1e-6, abs_tol=1e-9), (g, w)


@dataclass
class Cluster:
    settings: CelerySettings
    home: Path
    root: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. the S3 endpoint and PostgreSQL URL of tests/cluster/test_e2e.py

    def env(self) -> dict[str, str]:
        return {**_env(), "DAGSTER_HOME": str(self.home), "MSIF_CELERY_BROKER": self.settings.broker,
                "MSIF_CELERY_VISIBILITY_TIMEOUT": str(self.settings.visibility_timeout), **self.extra_env}

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, queues: tuple[str, ...], cli: bool = False) -> None:
        """A worker from :func:`worker_command`, or (``cli``) from `msif worker`, which runs it."""
        if cli:
            argv = [sys.executable, "-m", "msif_assets.app.cli", "worker", "--name", name, *(a for q in queues for a in ("--queue", q))]
            env = self.env()
        else:
            argv, env = worker_command(self.settings, queues, name=name, environ=self.env())
        with open(self.log(name), "ab") as out:
            self.workers[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        for name, proc in self.workers.items():
            while b" ready." not in self.log(name).read_bytes():
                assert proc.poll() is None, f"worker {name} exited: {self.log(name).read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"worker {name} not ready: {self.log(name).read_text()[-3000:]}"
                time.sleep(0.2)

    def materialize(self, config: Path, **popen) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "msif_assets.app.cli", "materialize", "--executor", "celery",
                                 "--config", str(config)], env=self.env(), cwd=self.root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **popen)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("celery-world")
    return root, make_world(root / "world", n_shards=SHARDS)


@pytest.fixture(scope="module")
def cluster(redis: RedisServer, world) -> Cluster:
    """Two GPU workers (default and gpu queues) and one CPU worker (default queue only), started
    now, ready by the time a test waits for them."""
    root, _ = world
    cluster = Cluster(CelerySettings(broker=redis.url, visibility_timeout=VISIBILITY_TIMEOUT), _home(root / "home", 2), root)
    try:
        cluster.start("w1", ("dagster", GPU_QUEUE))
        cluster.start("w2", ("dagster", GPU_QUEUE))
        cluster.start("cpu", ("dagster",), cli=True)
        yield cluster
    finally:
        for proc in cluster.workers.values():
            stop_group(proc, grace=20)


@pytest.fixture(scope="module")
def local_scores(world, cluster) -> list[tuple]:
    """The same world materialized in this process by the default (in-process) runner, while
    the workers start."""
    return local_run(*world)


def local_run(root: Path, inputs: dict[str, str]) -> list[tuple]:
    """The world materialized in this process by the default (in-process) runner: the reference."""
    from msif_assets.app.lineage import bring_up_to_date
    from msif_assets.config import load_config
    from msif_assets.defs.build import build_definitions

    config = load_config(_write_config(root, inputs, root / "local_lake"))
    instance = dg.DagsterInstance.from_config(str(_home(root / "local_home", 1)))
    bring_up_to_date(config, build_definitions(config), instance)
    return _scores(root / "local_lake")


def test_heavy_ops_are_tagged_for_the_gpu_queue():
    from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

    from msif_assets.config import MsifConfig
    from msif_assets.defs.build import build_definitions

    assert QUEUE_TAG == DAGSTER_CELERY_QUEUE_TAG
    inputs = {k: "/nonexistent" for k in ("inbox", "pretrained_model", "finetuned_model", "finetune_data", "queries")}
    graph = build_definitions(MsifConfig(lake_root="/nonexistent", inputs=inputs)).resolve_asset_graph()
    tagged = {k.to_user_string() for k in graph.materializable_asset_keys
              if graph.assets_def_for_key(k).op.tags.get(QUEUE_TAG) == GPU_QUEUE}
    assert tagged == HEAVY
    assert dict(HEAVY_OP_TAGS) == {DAGSTER_CELERY_QUEUE_TAG: GPU_QUEUE}


def test_the_executor_is_chosen_by_the_environment():
    from msif_assets.config import ConfigError
    from msif_assets.defs.executors import configured_executor

    assert configured_executor({}) is None and configured_executor({"MSIF_EXECUTOR": "default"}) is None
    assert configured_executor({"MSIF_EXECUTOR": "celery", "MSIF_CELERY_BROKER": "redis://h:6379/0"}).name == "celery"
    with pytest.raises(ConfigError, match="MSIF_CELERY_BROKER"):
        configured_executor({"MSIF_EXECUTOR": "celery"})
    with pytest.raises(ConfigError, match="MSIF_EXECUTOR='k8s'"):
        configured_executor({"MSIF_EXECUTOR": "k8s"})
    with pytest.raises(ConfigError, match="MSIF_CELERY_VISIBILITY_TIMEOUT"):
        configured_executor({"MSIF_EXECUTOR": "celery", "MSIF_CELERY_BROKER": "redis://h", "MSIF_CELERY_VISIBILITY_TIMEOUT": "soon"})


def test_celery_run_equals_local_run_and_spreads_over_workers(world, cluster, local_scores):
    root, inputs = world
    config = _write_config(root, inputs, root / "cluster_lake")
    cluster.wait_ready()
    started = time.monotonic()
    proc = cluster.materialize(config)
    out, _ = proc.communicate(timeout=600)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, out[-5000:]
    assert "on the celery workers" in out
    print(f"celery materialize of {SHARDS} shards on 2+1 workers: {seconds:.1f}s")

    _assert_same_scores(_scores(root / "cluster_lake"), local_scores)
    assert _duplicates(root / "cluster_lake") == 0

    instance = cluster.instance()
    runs = [r for r in instance.get_runs() if r.tags.get("msif/executor") == "celery"]
    assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    by_worker = steps_by_worker(instance, [r.run_id for r in runs])
    ran = {worker.split("@")[0]: {step for _, step in steps} for worker, steps in by_worker.items()}
    assert ran.get("w1") and ran.get("w2"), f"steps ran on {sorted(ran)} only"
    assert not (ran.get("cpu", set()) & HEAVY), f"the default-queue worker ran heavy steps: {ran['cpu'] & HEAVY}"
    # and the executor's own word for it: every heavy step was submitted to the gpu queue, every other to the default one
    queues = {}
    for run in runs:
        for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            message = record.dagster_event.message or ""
            if message.startswith("Submitting celery task for step"):
                queues[record.dagster_event.step_key] = message.rsplit('"', 2)[-2]
    assert HEAVY <= set(queues)
    assert {step: q for step, q in queues.items() if step in HEAVY} == {step: GPU_QUEUE for step in HEAVY}
    assert {q for step, q in queues.items() if step not in HEAVY} == {"dagster"}


def test_materialize_refuses_to_wait_for_a_queue_no_worker_takes(cluster):
    from msif_assets.app.cluster import check_workers
    from msif_assets.config import ConfigError

    cluster.wait_ready()
    workers = check_workers(cluster.settings)
    assert {w.split("@")[0]: q for w, q in workers.items()} == {"w1": ["dagster", "gpu"], "w2": ["dagster", "gpu"], "cpu": ["dagster"]}
    with pytest.raises(ConfigError, match=r"no Celery worker .* takes the queue\(s\) \['tpu'\]"):
        check_workers(cluster.settings, ("dagster", "tpu"))


def test_a_worker_killed_mid_step_loses_nothing(world, cluster, local_scores):
    """SIGKILL the worker running a heavy step: the step's task returns to the broker after the
    visibility timeout, another worker runs it, and the run finishes with the local result."""
    root, inputs = world
    config = _write_config(root, inputs, root / "killed_lake")
    cluster.wait_ready()
    instance = cluster.instance()
    before = {r.run_id for r in instance.get_runs()}
    started = time.monotonic()
    proc = cluster.materialize(config)
    try:
        victim = _freeze_a_worker_mid_step(cluster, instance, before, ("w1", "w2"), timeout=300)
        os.killpg(cluster.workers[victim[0]].pid, signal.SIGKILL)
        cluster.workers[victim[0]].wait(10)
        killed_at = time.monotonic()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    print(f"killed {victim[0]} running {victim[2]} at {killed_at - started:.1f}s; the run finished "
          f"{time.monotonic() - killed_at:.1f}s later")

    _assert_same_scores(_scores(root / "killed_lake"), local_scores)
    assert _duplicates(root / "killed_lake") == 0
    rerun = steps_by_worker(instance, [victim[1]])
    survivors = {w.split("@")[0] for w, steps in rerun.items() if (victim[1], victim[2]) in steps}
    assert victim[0] in survivors and survivors - {victim[0]}, f"{victim[2]} ran on {survivors}"


def _freeze_a_worker_mid_step(cluster: Cluster, instance, old_runs: set[str], names: tuple[str, ...],
                              timeout: float) -> tuple[str, str, str]:
    """Stop (SIGSTOP) one of the workers ``names`` while it executes a heavy step, and return
    (worker name, run id, step key). A step that turns out to have finished before the stop
    does not count: the worker is continued and the next one is taken."""
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        for name, run_id, step in _heavy_steps_started(instance, old_runs, names):
            if (run_id, step) in seen:
                continue
            seen.add((run_id, step))
            group = cluster.workers[name].pid
            os.killpg(group, signal.SIGSTOP)
            if step not in _finished_steps(instance, run_id):
                return name, run_id, step
            os.killpg(group, signal.SIGCONT)
        time.sleep(0.1)
    pytest.fail("no heavy step ran on a GPU worker in time")


def _heavy_steps_started(instance, old_runs: set[str], names: tuple[str, ...]):
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        if run.run_id not in old_runs:
            for worker, steps in steps_by_worker(instance, [run.run_id]).items():
                if worker.split("@")[0] in names:
                    yield from ((worker.split("@")[0], run_id, step) for run_id, step in steps if step in HEAVY)


def _finished_steps(instance, run_id: str) -> set[str]:
    return {r.dagster_event.step_key for r in instance.all_logs(run_id)
            if r.dagster_event and r.dagster_event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE")}
