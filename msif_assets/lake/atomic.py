"""Atomic writes: readers see the old file/partition or the new one, never half of one.

Files are written to a temporary name in the same directory (ending in ``.tmp``, so
no ``*.parquet`` / ``*.safetensors`` glob ever matches it), flushed, fsynced and then
moved over the target with ``os.replace`` (atomic on POSIX within one filesystem).

Directories (a table partition, a saved model) are filled in a staging directory and
then swapped in. On Linux the swap is a single ``renameat2(RENAME_EXCHANGE)`` call, so the target
path always exists; elsewhere the old directory is renamed aside first and the new
one renamed in (a reader may briefly find the partition missing, never half-written).
If the fill callback (or the body of an ``atomic_directory`` block) raises, the staging
directory is removed and the old target is untouched. Re-running replaces; it never appends.

On an object store (a lake root such as ``s3://bucket/prefix``) there is no rename: each file is
written to local scratch and published by one upload to its final key, which the store makes
visible whole or not at all; a directory is published file by file, each file atomic, and stale
files are deleted after (``lake/storage.py`` says which results rely on what).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .storage import LakePath, as_lake_path, is_remote, publish_file, scratch_dir

__all__ = [
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_text",
    "replace_directory",
]


def _fsync_dir(path: LakePath) -> None:
    if is_remote(path):
        return  # nothing to sync: an upload is durable once it returns
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms/filesystems cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _temp_sibling(path: LakePath) -> Path:
    """Where ``path`` is written before it is published: beside it locally (same filesystem, so
    ``os.replace`` is atomic), in local scratch for an object store (then uploaded)."""
    name = f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    return scratch_dir() / name if is_remote(path) else path.with_name(name)


def _publish(tmp: Path, target: LakePath) -> None:
    """Move the finished ``tmp`` onto ``target``: a rename locally, one upload to an object store."""
    if is_remote(target):
        publish_file(tmp, target)
        return
    os.replace(tmp, target)


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` to produce the file, then move it onto ``path``.

    ``writer`` must create ``tmp_path`` (any library that writes to a path works:
    ``pq.write_table``, ``safetensors.torch.save_file``...). On any exception the
    temporary file is deleted and the previous ``path`` (if any) is left untouched.
    """
    target = as_lake_path(path)
    if not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        writer(tmp)
        if not tmp.is_file():
            raise RuntimeError(f"atomic_write: writer did not create {tmp} for {target}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomically replace ``path`` with ``text``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically replace ``path`` with ``obj`` as indented, key-sorted JSON plus a newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Atomically replace ``path`` with one JSON object per line (non-ASCII kept as is)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2() -> Callable[[bytes, bytes], int] | None:
    """Return a ``renameat2(..., RENAME_EXCHANGE)`` wrapper, or None if unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def exchange(a: bytes, b: bytes) -> int:
        if fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE) == 0:
            return 0
        return ctypes.get_errno()

    return exchange


_EXCHANGE = _load_renameat2()


def _swap_in(staged: Path, target: Path, aside: Path) -> None:
    if not target.exists():
        os.rename(staged, target)
        return
    if _EXCHANGE is not None and _EXCHANGE(os.fsencode(staged), os.fsencode(target)) == 0:
        shutil.rmtree(staged)  # after the exchange, `staged` holds the old content
        return
    # Fallback: rename aside, rename in. If we crash in between, the old content is
    # still complete at `aside` (inside the staging dir) and a rerun rewrites target.
    os.rename(target, aside)
    os.rename(staged, target)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_directory(
    target: str | os.PathLike[str], staging_dir: str | os.PathLike[str] | None = None
) -> Iterator[Path]:
    """Yield an empty staging directory; when the block exits cleanly it is swapped in as ``target``.

    ``staging_dir`` (default: ``target``'s parent) must be on the same filesystem as
    ``target``; the staging entries are hidden (``.<name>.<token>.new``). If the block
    raises, the staging directory is removed and nothing at ``target`` changes.
    """
    target_path = as_lake_path(target)
    if is_remote(target_path):
        with _remote_directory(target_path) as staged:
            yield staged
        return
    staging = target_path.parent if staging_dir is None else Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    target_path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    staged = staging / f".{target_path.name}.{token}.new"
    aside = staging / f".{target_path.name}.{token}.old"
    staged.mkdir()
    try:
        yield staged
        _fsync_tree(staged)
        _swap_in(staged, target_path, aside)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _fsync_dir(target_path.parent)


@contextmanager
def _remote_directory(target: LakePath) -> Iterator[Path]:
    staged = Path(tempfile.mkdtemp(dir=scratch_dir(), suffix=".new"))
    try:
        yield staged
        fresh = {f.relative_to(staged).as_posix() for f in staged.rglob("*") if f.is_file()}
        for rel in sorted(fresh):
            publish_file(staged / rel, target / rel)
        if target.exists():
            for old in target.rglob("*"):
                if old.is_file() and old.relative_to(target).as_posix() not in fresh:
                    old.unlink()
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def replace_directory(
    target: str | os.PathLike[str],
    fill: Callable[[Path], None],
    staging_dir: str | os.PathLike[str],
) -> Path:
    """Build a directory with ``fill(tmp_dir)`` and swap it in as ``target``.

    ``staging_dir`` must be on the same filesystem as ``target`` and outside any glob
    that readers use (the lake uses ``<root>/.staging``). On an exception inside
    ``fill`` nothing at ``target`` changes.
    """
    with atomic_directory(target, staging_dir) as staged:
        fill(staged)
    return as_lake_path(target)
