"""Where the lake lives: a local directory, or an object-store URI such as ``s3://bucket/prefix``.

A lake root that is a URI (any fsspec protocol: ``s3``, ``gs``, ``az``, ``memory`` ...) becomes a
:class:`upath.UPath`; a plain path stays a :class:`pathlib.Path`, so a local lake behaves exactly
as before. Every lake path comes from :class:`~msif_assets.lake.layout.LakeLayout`, so the rest of
msif handles both through pathlib's API (``/``, ``glob``, ``is_file``, ``open``, ``unlink``), plus
the helpers here for libraries that need a filesystem handed to them (pyarrow, LanceDB, DuckDB).

Credentials and the endpoint come from each store's standard environment; for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and, for an
S3-compatible server (MinIO, moto, Ceph), ``AWS_ENDPOINT_URL``.

Publishing on an object store, which has no rename (``lake/atomic.py`` uses these):

* A file (a Parquet partition, a safetensors factor file, a query block, an evaluation table)
  is written to a local scratch file, then published by **one** upload to its final key: a
  single PUT, or a multipart upload that becomes visible only when it is completed. S3 never
  shows a partial object, so a reader sees the old object or the new one, and an upload killed
  midway publishes nothing.
* A set of files that must change together (one score key's query blocks) is published by a
  **marker** written last, and unpublished by deleting that marker first
  (``pipeline/query_store.py``).
* Embeddings: LanceDB commits each write as a new table version through its own manifest.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Union

from upath import UPath

__all__ = [
    "LakePath", "LakeStorageError", "lake_path", "as_lake_path", "is_remote", "require_bucket", "require_local",
    "parquet_location", "open_binary", "publish_file", "scratch_dir", "local_file",
    "lancedb_storage_options", "register_with_duckdb",
]

LakePath = Union[Path, UPath]

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_LOCAL_PROTOCOLS = {"file", "local"}
ENV_SCRATCH = "MSIF_SCRATCH"


class LakeStorageError(ValueError):
    """A lake root or path that msif cannot use; the message says what to change."""


def _remote_uri(uri: str, what: str) -> UPath:
    match = _URI.match(uri)
    assert match is not None
    protocol, rest = match.group(1).lower(), match.group(2)
    import fsspec

    if protocol not in fsspec.available_protocols():
        raise LakeStorageError(f"{what} {uri!r}: unknown storage protocol {protocol!r}; use a local path or a URI "
                               "such as s3://bucket/prefix (any fsspec protocol whose package is installed)")
    if "?" in rest or "#" in rest:
        raise LakeStorageError(f"{what} {uri!r}: query strings and fragments are not allowed; give credentials and "
                               "the endpoint in the environment (for S3: AWS_* variables, AWS_ENDPOINT_URL)")
    parts = [p for p in rest.split("/") if p]
    if not parts and protocol != "memory":
        raise LakeStorageError(f"{what} {uri!r}: name a bucket, e.g. {protocol}://my-bucket/msif-lake")
    if any(p in (".", "..") for p in parts) or "//" in rest.strip("/"):
        raise LakeStorageError(f"{what} {uri!r}: '.', '..' and empty path segments are not allowed")
    return UPath(f"{protocol}://{'/'.join(parts)}")


def lake_path(root: str | os.PathLike[str], what: str = "lake root") -> LakePath:
    """A lake root as a path: ``Path`` (absolute, resolved) for a local directory or ``file://``
    URI, ``UPath`` for an object-store URI. Raises LakeStorageError for an unusable URI."""
    if isinstance(root, UPath):
        return root if is_remote(root) else Path(root.path).expanduser().resolve()
    text = os.fspath(root)
    match = _URI.match(text)
    if match is None:
        return Path(text).expanduser().resolve()
    if match.group(1).lower() in _LOCAL_PROTOCOLS:
        return Path("/" + match.group(2).lstrip("/")).resolve()
    return _remote_uri(text, what)


def as_lake_path(path: str | os.PathLike[str]) -> LakePath:
    """``path`` unchanged if it is already a lake path (UPath or Path), else parsed like a root
    (a string URI stays remote); unlike :func:`lake_path`, a local path is not resolved."""
    if isinstance(path, (UPath, Path)):
        return path if not isinstance(path, UPath) or is_remote(path) else Path(path.path)
    text = os.fspath(path)
    return lake_path(text) if _URI.match(text) else Path(text)


def is_remote(path: object) -> bool:
    """True for a path on an object store (not the local filesystem)."""
    if not isinstance(path, UPath):
        return False
    return not (set(path.fs.protocol if isinstance(path.fs.protocol, (tuple, list)) else [path.fs.protocol]) & _LOCAL_PROTOCOLS)


def require_bucket(root: LakePath) -> None:
    """A LakeStorageError, before any work, when an object-store root's bucket cannot be seen."""
    if not is_remote(root) or not root.path.strip("/"):
        return
    bucket = root.path.strip("/").split("/")[0]
    try:
        found = root.fs.exists(bucket)
    except (OSError, PermissionError, ValueError) as err:
        raise LakeStorageError(f"lake root {root}: cannot reach the store ({err}); check the credentials and the endpoint "
                               "in the environment (for S3: AWS_* variables, AWS_ENDPOINT_URL)") from None
    if not found:
        raise LakeStorageError(f"lake root {root}: the bucket {bucket!r} does not exist, or these credentials cannot see "
                               "it; create it first (msif never creates buckets) or fix AWS_* / AWS_ENDPOINT_URL")


def require_local(path: LakePath, what: str) -> Path:
    """``path`` as a local Path, or a LakeStorageError saying ``what`` needs a local lake."""
    if is_remote(path):
        raise LakeStorageError(f"{what} needs a lake on the local filesystem; {path} is on an object store. "
                               "Run it against a local lake root (--lake /path or [lake] root)")
    return Path(path)


def parquet_location(path: LakePath) -> tuple[str, Any]:
    """``(path, filesystem)`` for pyarrow (``pq.read_table(p, filesystem=fs)``); fs is None locally."""
    if is_remote(path):
        return path.path, path.fs
    return os.fspath(path), None


def open_binary(path: LakePath) -> IO[bytes]:
    """Open for random-access reading: unbuffered locally, plain range reads on an object store
    (each ``read``/``readinto`` of a tensor is one ranged GET; no read-ahead cache)."""
    if is_remote(path):
        return path.fs.open(path.path, "rb", cache_type="none")
    return open(path, "rb", buffering=0)


def scratch_dir() -> Path:
    """Local scratch space for files on their way to an object store (``$MSIF_SCRATCH`` or the
    system temp dir). It must hold the largest single file msif writes (the factor files)."""
    root = Path(os.environ.get(ENV_SCRATCH) or tempfile.gettempdir()) / "msif-scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def publish_file(local: Path, target: LakePath) -> None:
    """Upload ``local`` to ``target`` in one object write (see the module doc), then delete it."""
    try:
        target.fs.put_file(os.fspath(local), target.path)
    finally:
        local.unlink(missing_ok=True)


@contextmanager
def local_file(path: LakePath) -> Iterator[Path]:
    """A local path holding ``path``'s content for libraries that only read local files
    (downloaded to scratch for an object store; the file itself when local)."""
    if not is_remote(path):
        yield Path(path)
        return
    folder = Path(tempfile.mkdtemp(dir=scratch_dir()))
    try:
        local = folder / path.name
        path.fs.get_file(path.path, os.fspath(local))
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def lancedb_storage_options(root: LakePath) -> dict[str, str] | None:
    """LanceDB's ``storage_options`` for an S3 root, from the same AWS_* environment s3fs reads
    (LanceDB's object store does not read ``AWS_ENDPOINT_URL`` or allow plain http by itself)."""
    if not is_remote(root) or "s3" not in root.fs.protocol:
        return None
    env = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
           "aws_session_token": "AWS_SESSION_TOKEN", "aws_region": "AWS_DEFAULT_REGION", "aws_endpoint": "AWS_ENDPOINT_URL"}
    options = {key: os.environ[name] for key, name in env.items() if os.environ.get(name)}
    if options.get("aws_endpoint", "").startswith("http://"):
        options["allow_http"] = "true"
    return options


def register_with_duckdb(connection: Any, root: LakePath) -> None:
    """Let DuckDB read the lake's URIs through the lake's own fsspec filesystem (no DuckDB
    extension is downloaded at run time)."""
    if is_remote(root):
        connection.register_filesystem(root.fs)


def normalized_inside(root: LakePath, path: LakePath) -> bool:
    """Whether ``path`` (after removing ``.``/``..``) lies at or below ``root``."""
    if is_remote(root):
        inner, outer = posixpath.normpath(path.path), posixpath.normpath(root.path)
        return inner == outer or inner.startswith(outer.rstrip("/") + "/")
    normalized = Path(os.path.normpath(path))
    return normalized == root or root in normalized.parents
