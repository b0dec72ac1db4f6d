"""Session-wide real servers for the cluster tests (tests/servers.py): PostgreSQL, Redis, S3.

Each starts on first use and stops when the test session ends. A missing server binary fails
the test that asks for it, with the package to install; it is never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..servers import PostgresServer, RedisServer, S3Server, postgres_server, redis_server, s3_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server
