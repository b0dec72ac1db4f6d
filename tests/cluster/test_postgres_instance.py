"""msif's Dagster instance on PostgreSQL (deploy/postgres/dagster.yaml): a real `msif
materialize` with that file in $DAGSTER_HOME records its runs and asset materializations in the
database, and another instance opened from the same $DAGSTER_HOME sees them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import pytest

from msif_assets.app.lineage import REPO_ROOT

from ..defs.byo_world import COMPUTE, make_world
from ..servers import PostgresServer

POSTGRES_YAML = REPO_ROOT / "deploy" / "postgres" / "dagster.yaml"


def _config(root: Path) -> Path:
    inputs = make_world(root, n_shards=1)
    lines = ["[lake]", f'root = "{root / "lake"}"', "[inputs]"] + [f'{k} = "{v}"' for k, v in inputs.items()]
    lines += ["[compute]"] + [f"{k} = {json.dumps(v)}" for k, v in COMPUTE.items()]
    path = root / "msif.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _msif(config: Path, home: Path, pg: PostgresServer) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MSIF_CONFIG", "MSIF_LAKE")}
    env.update(DAGSTER_HOME=str(home), MSIF_POSTGRES_URL=pg.sqlalchemy_url)
    return subprocess.run([sys.executable, "-m", "msif_assets.app.cli", "materialize", "--config", str(config)],
                          env=env, cwd=config.parent, capture_output=True, text=True, timeout=900)


def _query(pg: PostgresServer, sql: str) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(pg.url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def materialized(postgres: PostgresServer, tmp_path_factory):
    """One `msif materialize` of a one-shard world into a fresh database of the session's server."""
    pg = postgres.create_database(f"msif_instance_{uuid.uuid4().hex[:8]}")
    root = tmp_path_factory.mktemp("pg-instance")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(POSTGRES_YAML, home / "dagster.yaml")
    config = _config(root)
    done = _msif(config, home, pg)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return pg, home, config, done


def test_the_yaml_matches_the_default_instance_but_for_storage():
    import yaml

    default = yaml.safe_load((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    postgres = yaml.safe_load(POSTGRES_YAML.read_text())
    assert postgres.pop("storage") == {"postgres": {"postgres_url": {"env": "MSIF_POSTGRES_URL"}}}
    assert postgres == default


def test_runs_and_materializations_are_stored_in_postgres(materialized):
    pg, home, _, done = materialized
    assert not (home / "history").exists(), "the runs went to SQLite under $DAGSTER_HOME/history"
    runs = _query(pg, "SELECT run_id, status FROM runs")
    assert runs, done.stdout
    assert {status for _, status in runs} == {"SUCCESS"}, runs
    events = _query(pg, "SELECT run_id, asset_key, partition FROM event_logs "
                        "WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
    assert events
    assert {run_id for run_id, _, _ in events} <= {run_id for run_id, _ in runs}
    materialized = {(dg.AssetKey.from_db_string(key), partition) for _, key, partition in events}
    assert (dg.AssetKey("influence_scores"), "shard-0") in materialized, materialized
    # what `msif materialize` reported is what the database holds
    reported = int(done.stdout.split()[0])
    assert reported == len(events), (done.stdout, len(events))


def test_another_instance_from_the_same_home_sees_them(materialized, monkeypatch):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    pg, home, _, _ = materialized
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("MSIF_POSTGRES_URL", pg.sqlalchemy_url)
    events = _query(pg, "SELECT asset_key, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert {r.run_id for r in instance.get_runs()} == {run_id for run_id, in _query(pg, "SELECT run_id FROM runs")}
        for key, partition in events:
            key = dg.AssetKey.from_db_string(key)
            if partition is None:
                assert instance.get_latest_materialization_event(key) is not None, key
            else:
                assert partition in instance.get_materialized_partitions(key), (key, partition)
