"""Past one machine, end to end, with every piece real: the lake in an S3 bucket (moto's
server), the Dagster instance on PostgreSQL, Redis as the Celery broker and two Celery worker
processes. One worker is SIGKILLed in the middle of a heavy step; the run still finishes, and
the influence table in the bucket equals a local single-process run's, without duplicate rows.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from msif_assets.app.cluster import steps_by_worker
from msif_assets.defs.executors import GPU_QUEUE, CelerySettings

from ..processes import stop_group
from ..servers import PostgresServer, RedisServer, S3Server
from ..defs.byo_world import make_world
from .test_celery_executor import (SHARDS, VISIBILITY_TIMEOUT, Cluster, _assert_same_scores, _duplicates,
                                   _freeze_a_worker_mid_step, _scores, _write_config, local_run)


@pytest.fixture(scope="module")
def e2e_world(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("e2e-world")
    return root, make_world(root / "world", n_shards=SHARDS)


def _postgres_home(path: Path) -> Path:
    """deploy/postgres/dagster.yaml's storage, with the msif_heavy pool admitting both workers."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nstorage:\n  postgres:\n    postgres_url:\n      env: MSIF_POSTGRES_URL\n"
        "concurrency:\n  pools:\n    default_limit: 2\n    granularity: op\n")
    return path


@pytest.fixture(scope="module")
def bucket_cluster(redis: RedisServer, postgres: PostgresServer, s3: S3Server, e2e_world):
    root, _ = e2e_world
    pg = postgres.create_database(f"msif_e2e_{uuid.uuid4().hex[:8]}")
    extra = {**s3.env(), "MSIF_POSTGRES_URL": pg.sqlalchemy_url}
    cluster = Cluster(CelerySettings(broker=redis.url.rsplit("/", 1)[0] + "/1", visibility_timeout=VISIBILITY_TIMEOUT),
                      _postgres_home(root / "pg-home"), root, extra_env=extra)
    try:
        cluster.start("e2e-a", ("dagster", GPU_QUEUE))
        cluster.start("e2e-b", ("dagster", GPU_QUEUE))
        yield cluster, s3.make_bucket(f"e2e-{uuid.uuid4().hex[:8]}")
    finally:
        for proc in cluster.workers.values():
            stop_group(proc, grace=20)


def test_bucket_postgres_and_two_workers_survive_a_killed_worker(e2e_world, bucket_cluster, s3, monkeypatch):
    cluster, bucket = bucket_cluster
    root, inputs = e2e_world
    local_scores = local_run(root, inputs)  # while the workers start
    lake = f"s3://{bucket}/msif"
    config = _write_config(root, inputs, lake)
    cluster.wait_ready()
    for key, value in cluster.extra_env.items():
        monkeypatch.setenv(key, value)  # this process reads the bucket and the instance too
    instance = dg.DagsterInstance.from_config(str(cluster.home))
    started = time.monotonic()
    proc = cluster.materialize(config)
    try:
        victim = _freeze_a_worker_mid_step(cluster, instance, set(), ("e2e-a", "e2e-b"), timeout=300)
        os.killpg(cluster.workers[victim[0]].pid, signal.SIGKILL)
        cluster.workers[victim[0]].wait(10)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    print(f"{SHARDS} shards, bucket + PostgreSQL + 2 workers, one killed running {victim[2]}: {time.monotonic() - started:.1f}s")

    _assert_same_scores(_scores(lake), local_scores)
    assert _duplicates(lake) == 0
    runs = [r for r in instance.get_runs() if r.tags.get("msif/executor") == "celery"]
    assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    ran = {w.split("@")[0] for w in steps_by_worker(instance, [r.run_id for r in runs])}
    assert ran == {"e2e-a", "e2e-b"}, ran
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys and not [k for k in keys if k.endswith(".tmp")], "a temporary key was left in the bucket"
