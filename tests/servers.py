"""Real servers for tests: PostgreSQL, Redis and an S3 endpoint (moto), each on 127.0.0.1.

Each context manager starts its server in its own process group, in a fresh temporary
directory, on a free port; waits until it accepts connections (or raises ``ServerError`` with
the tail of its log); yields a small frozen dataclass describing it; and on exit (also when the
body raised) stops the whole process group and deletes the directory::

    with postgres_server() as pg:      # pg.url == "postgresql://msif:...@127.0.0.1:PORT/msif"
        ...
    with redis_server() as r:          # r.url == "redis://127.0.0.1:PORT/0"
        ...
    with s3_server() as s3:            # s3.endpoint_url == "http://127.0.0.1:PORT"
        s3.make_bucket("lake")
        env = {**os.environ, **s3.env()}

A missing server binary is an error that names the package to install, never a skip.
PostgreSQL refuses to run as root: as root, initdb and postgres run as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .processes import stop_group

START_TIMEOUT = 120.0  # seconds; generous, the test machines are small and busy


class ServerError(RuntimeError):
    """A test server could not be found, started, or did not become ready in time."""


@dataclass(frozen=True)
class PostgresServer:
    url: str  # postgresql://user:password@127.0.0.1:port/db
    host: str
    port: int
    user: str
    password: str
    db: str

    @property
    def sqlalchemy_url(self) -> str:
        """``url`` naming the psycopg2 driver, for SQLAlchemy and so for Dagster's postgres
        storage (MSIF_POSTGRES_URL): SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3,
        which dagster-postgres does not install (it requires psycopg2-binary)."""
        return self.url.replace("postgresql://", "postgresql+psycopg2://", 1)

    def create_database(self, name: str) -> "PostgresServer":
        """Create database ``name`` (owned by this server's user) on this server; the same
        server, with ``name`` as its database. Tests that share the session's server use it
        to keep their tables apart."""
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(self.url)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        url = f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{name}"
        return dataclasses.replace(self, url=url, db=name)


@dataclass(frozen=True)
class RedisServer:
    url: str  # redis://127.0.0.1:port/0
    port: int


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str  # http://127.0.0.1:port
    port: int
    access_key: str
    secret_key: str
    region: str

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3/botocore/s3fs (in this or a child process) here."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self):
        """A boto3 S3 client for this endpoint."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return its name."""
        self.client().create_bucket(Bucket=name)
        return name


# --- helpers -------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


def _wait_ready(name: str, proc: subprocess.Popen, log: Path, ready, timeout: float) -> None:
    """Poll ``ready()`` until it is true; raise ServerError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerError(f"{name} exited with status {proc.returncode} before it was ready; "
                              f"log tail ({log}):\n{_log_tail(log)}")
        try:
            if ready():
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"{name} did not accept connections within {timeout:.0f} s; "
                              f"log tail ({log}):\n{_log_tail(log)}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, first_signal: int = signal.SIGTERM, grace: float = 30) -> None:
    """Send ``first_signal`` to the process group of ``proc``, SIGKILL it after ``grace`` s."""
    if first_signal == signal.SIGTERM:
        stop_group(proc, grace)
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, first_signal)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _missing(binary: str, install: str) -> ServerError:
    return ServerError(f"{binary} not found; install it with {install}")


@contextlib.contextmanager
def _tempdir(prefix: str, owner: pwd.struct_passwd | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- PostgreSQL ----------------------------------------------------------------------------

def _postgres_bindir() -> Path:
    """The directory holding initdb/postgres/pg_isready: PATH first, then Debian's layout."""
    found = shutil.which("initdb")
    if found:
        bindir = Path(found).resolve().parent  # e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin
        if all((bindir / b).exists() for b in ("postgres", "pg_isready", "createdb")):
            return bindir
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.parent.name.split(".")],
    )
    for initdb in reversed(candidates):
        bindir = Path(initdb).parent
        if all((bindir / b).exists() for b in ("postgres", "pg_isready", "createdb")):
            return bindir
    raise _missing("PostgreSQL server binaries (initdb, postgres, pg_isready, createdb; looked on PATH and in "
                   "/usr/lib/postgresql/*/bin)", "the Debian package `postgresql` "
                   "(apt-get install postgresql)")


@contextlib.contextmanager
def postgres_server(db: str = "msif", user: str = "msif",
                    timeout: float = START_TIMEOUT) -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster (initdb + postgres) with database ``db`` owned by ``user``.

    Password authentication (scram-sha-256) over TCP on 127.0.0.1; the Unix socket lives in
    the temporary directory. Durability is off (fsync, synchronous_commit): it is a test server.
    """
    bindir = _postgres_bindir()
    run_as: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            run_as = pwd.getpwnam("postgres")
        except KeyError:
            raise ServerError("PostgreSQL refuses to run as root and there is no `postgres` user; "
                              "install the Debian package `postgresql` (it creates the user)") from None
    as_user = ({"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
               if run_as else {})
    password = secrets.token_hex(12)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGPASSWORD": password}
    if run_as:
        env.update(HOME=run_as.pw_dir, USER="postgres", LOGNAME="postgres")

    with _tempdir("msif-postgres-", run_as) as root:
        data, log = root / "data", root / "postgres.log"
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if run_as:
            os.chown(pwfile, run_as.pw_uid, run_as.pw_gid)
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
             "--no-sync"],
            cwd=root, env=env, capture_output=True, text=True, timeout=max(timeout, 60), **as_user,
        )
        if initdb.returncode != 0:
            raise ServerError(f"initdb failed with status {initdb.returncode}:\n"
                              f"{initdb.stdout[-4000:]}{initdb.stderr[-4000:]}")
        for attempt in range(3):
            port = free_port()
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                     "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=200"],
                    cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, **as_user,
                )
            try:
                def ready() -> bool:
                    return subprocess.run(
                        [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port),
                         "-U", user, "-d", "postgres"], env=env, timeout=30,
                    ).returncode == 0
                try:
                    _wait_ready("postgres", proc, log, ready, timeout)
                except ServerError:
                    if attempt < 2 and proc.poll() is not None and "already in use" in _log_tail(log):
                        continue  # lost the race for the port: try another
                    raise
                created = subprocess.run(
                    [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user,
                     "-O", user, db], env=env, capture_output=True, text=True, timeout=60,
                )
                if created.returncode != 0:
                    raise ServerError(f"createdb {db} failed: {created.stderr.strip()}; "
                                      f"log tail ({log}):\n{_log_tail(log)}")
                yield PostgresServer(
                    url=f"postgresql://{user}:{password}@127.0.0.1:{port}/{db}",
                    host="127.0.0.1", port=port, user=user, password=password, db=db,
                )
                return
            finally:
                # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients (pools
                # left open by the code under test) to disconnect, as SIGTERM's smart one does
                _stop(proc, signal.SIGINT)


# --- Redis ---------------------------------------------------------------------------------

def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


@contextlib.contextmanager
def redis_server(timeout: float = START_TIMEOUT) -> Iterator[RedisServer]:
    """A throwaway redis-server without persistence (no RDB snapshots, no AOF)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise _missing("redis-server", "the Debian package `redis-server` "
                       "(apt-get install redis-server)")
    with _tempdir("msif-redis-") as root:
        log = root / "redis.log"
        for attempt in range(3):
            port = free_port()
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(root), "--daemonize", "no"],
                    cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                try:
                    _wait_ready("redis-server", proc, log, lambda: _redis_ping(port), timeout)
                except ServerError:
                    if attempt < 2 and proc.poll() is not None and "already in use" in _log_tail(log):
                        continue
                    raise
                yield RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port)
                return
            finally:
                _stop(proc)


# --- S3 (moto) -----------------------------------------------------------------------------

def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500  # it answers HTTP: it is up


@contextlib.contextmanager
def s3_server(timeout: float = START_TIMEOUT) -> Iterator[S3Server]:
    """moto's standalone server (``python -m moto.server``), credentials testing/testing."""
    missing = [m for m in ("moto", "flask", "flask_cors") if importlib.util.find_spec(m) is None]
    if missing:
        raise _missing(f"the Python module(s) {', '.join(missing)} (for `python -m moto.server`)",
                       "pip install 'moto[server]'")
    if importlib.util.find_spec("boto3") is None:
        raise _missing("the Python module boto3", "pip install boto3")
    with _tempdir("msif-s3-") as root:
        log = root / "moto.log"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        for attempt in range(3):
            port = free_port()
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            url = f"http://127.0.0.1:{port}"
            try:
                try:
                    _wait_ready("moto server", proc, log,
                                lambda: port_open(port) and _http_ok(url + "/moto-api/"), timeout)
                except ServerError:
                    if attempt < 2 and proc.poll() is not None and "already in use" in _log_tail(log):
                        continue
                    raise
                yield S3Server(endpoint_url=url, port=port, access_key="testing",
                               secret_key="testing", region="us-east-1")
                return
            finally:
                _stop(proc)
