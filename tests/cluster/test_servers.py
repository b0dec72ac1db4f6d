"""The test servers of tests/servers.py really serve, and are gone once their context exits."""

from __future__ import annotations

import uuid

import pytest

from ..servers import (PostgresServer, RedisServer, S3Server, port_open, postgres_server,
                       redis_server, s3_server)


def test_postgres_serves(postgres: PostgresServer):
    import psycopg2

    assert postgres.url == (f"postgresql://{postgres.user}:{postgres.password}"
                            f"@127.0.0.1:{postgres.port}/{postgres.db}")
    with psycopg2.connect(postgres.url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (k text PRIMARY KEY, v int)")
        cur.execute("INSERT INTO t VALUES ('a', 1), ('b', 2)")
        cur.execute("SELECT current_database(), current_user, sum(v) FROM t")
        assert cur.fetchone() == (postgres.db, postgres.user, 2 + 1)
        cur.execute("DROP TABLE t")
    conn.close()


def test_postgres_requires_its_password(postgres: PostgresServer):
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(host=postgres.host, port=postgres.port, user=postgres.user,
                         password="wrong", dbname=postgres.db)


def test_redis_serves(redis: RedisServer):
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    try:
        assert client.ping()
        client.set("msif:key", b"value")
        assert client.get("msif:key") == b"value"
    finally:
        client.close()


def test_s3_serves(s3: S3Server):
    bucket = s3.make_bucket(f"msif-{uuid.uuid4().hex[:8]}")
    client = s3.client()
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello lake")
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello lake"
    assert set(s3.env()) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                             "AWS_ENDPOINT_URL"}
    assert s3.env()["AWS_ENDPOINT_URL"] == s3.endpoint_url


def test_s3_env_reaches_boto3(s3: S3Server, monkeypatch):
    """A client built from the environment alone (as s3fs or a child process builds it) lands here."""
    import boto3

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3.make_bucket(f"msif-{uuid.uuid4().hex[:8]}")
    boto3.client("s3").put_object(Bucket=bucket, Key="k", Body=b"v")
    assert s3.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


@pytest.mark.parametrize("start", [postgres_server, redis_server, s3_server],
                         ids=["postgres", "redis", "s3"])
def test_port_closed_after_exit(start):
    with start() as server:
        port = server.port
        assert port_open(port)
    assert not port_open(port)


@pytest.mark.parametrize("start", [postgres_server, redis_server, s3_server],
                         ids=["postgres", "redis", "s3"])
def test_stopped_even_when_the_body_fails(start):
    with pytest.raises(ZeroDivisionError):
        with start() as server:
            port = server.port
            1 / 0
    assert not port_open(port)


def test_missing_binary_is_a_clear_error(monkeypatch):
    from .. import servers

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(servers.ServerError, match=r"redis-server not found.*apt-get install redis-server"):
        with redis_server():
            pass
    monkeypatch.setattr(servers.glob, "glob", lambda pattern: [])
    with pytest.raises(servers.ServerError, match=r"apt-get install postgresql"):
        with postgres_server():
            pass
    monkeypatch.setattr(servers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(servers.ServerError, match=r"moto.*pip install 'moto\[server\]'"):
        with s3_server():
            pass
