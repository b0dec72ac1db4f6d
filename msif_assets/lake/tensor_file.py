"""Reading safetensors files one tensor at a time (the writing half is ``lake/factor_store.py``).

:class:`TensorFile` is a lazy ``Mapping[str, Tensor]``: only the header is read when it is
opened, and each lookup reads that tensor (one ranged read on an object store).
:func:`load_tensors` and :func:`read_metadata` read a whole file or only its header.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import IO, Any, Iterator, Mapping, NamedTuple

import torch
from safetensors import safe_open

from msif_assets.lake.factor_store import _DTYPES, _MAX_HEADER, MissingArtifactError, _nbytes, _raw_bytes
from msif_assets.lake.storage import LakePath, as_lake_path, is_remote, open_binary

__all__ = ["TensorFile", "load_tensors", "read_metadata", "update_content_digest"]


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    nbytes: int


def _read_exact(fh: IO[bytes], offset: int, n: int) -> bytes:
    fh.seek(offset)
    data = b""
    while len(data) < n:
        chunk = fh.read(n - len(data))
        if not chunk:
            raise ValueError(f"unexpected end of file at byte {offset + len(data)}")
        data += chunk
    return data


def _parse_header(fh: IO[bytes], path: LakePath) -> tuple[dict[str, _Entry], dict[str, str]]:
    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid safetensors file: {why}")

    size = fh.seek(0, os.SEEK_END)  # works for local files and object-store files alike
    if size < 8:
        raise bad("shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", _read_exact(fh, 0, 8))
    if length > min(_MAX_HEADER, size - 8):
        raise bad(f"header length {length} exceeds the file ({size} bytes)")
    try:
        header = json.loads(_read_exact(fh, 8, length))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map str to str")
    start, entries = 8 + length, {}
    for name, info in header.items():
        try:
            dtype, shape = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is malformed: {info!r}") from None
        if any(d < 0 for d in shape) or end - begin != _nbytes(dtype, shape):
            raise bad(f"entry {name!r}: offsets {begin}..{end} do not hold {info['dtype']} {list(shape)}")
        entries[name] = _Entry(dtype, shape, start + begin, end - begin)
    position = start
    for name, entry in sorted(entries.items(), key=lambda item: item[1].begin):
        if entry.begin != position:
            raise bad(f"tensor {name!r} does not start where the previous one ends")
        position += entry.nbytes
    if position != size:
        raise bad(f"the tensors cover {position - start} data bytes, the file holds {size - start}")
    return dict(sorted(entries.items(), key=lambda item: item[1].begin)), metadata


class TensorFile(Mapping[str, torch.Tensor]):
    """A read-only, lazy ``Mapping[str, Tensor]`` over a safetensors file.

    Only the header is read on construction; ``tf[name]`` reads that tensor from disk into a
    fresh tensor every time (no cache: the caller decides what stays in memory). The file is
    held open, so a file atomically replaced after construction is still read consistently
    (the old content). Keys are in file order. ``metadata`` is the header's ``str -> str`` map.
    Missing file: :class:`MissingArtifactError`; a malformed one: ValueError.
    """

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        self.path = as_lake_path(path)
        if not self.path.is_file():
            raise MissingArtifactError(f"no safetensors file at {self.path}")
        self.device = torch.device(device)
        self._fh: IO[bytes] = open_binary(self.path)
        self._lock = threading.Lock()
        try:
            self._entries, self.metadata = _parse_header(self._fh, self.path)
        except BaseException:
            self._fh.close()
            raise

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        buffer, done = _raw_bytes(out), 0
        with self._lock:
            self._fh.seek(entry.begin)
            while done < entry.nbytes:
                got = self._fh.readinto(buffer[done:])
                if not got:
                    raise ValueError(f"{self.path} is truncated: {name!r} ends past the end of the file")
                done += got
        return out if self.device.type == "cpu" else out.to(self.device)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name`` (from the header; nothing is read)."""
        return self._entries[name].shape

    def view(self, suffix: str) -> Mapping[str, torch.Tensor]:
        """``{prefix: tensor}`` over the names ``<prefix>::<suffix>``, read lazily like the file,
        e.g. ``TensorFile(p).view("q_a")["gpt_neox.layers.0.mlp.dense_4h_to_h"]``."""
        return _SuffixView(self, suffix)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, {len(self)} tensors)"


class _SuffixView(Mapping[str, torch.Tensor]):
    def __init__(self, source: TensorFile, suffix: str) -> None:
        tail = f"::{suffix}"
        self._source = source
        self._names = {key[: -len(tail)]: key for key in source if key.endswith(tail)}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._source[self._names[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_tensors(
    path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata header of a safetensors file (the whole file in
    memory: prefer :class:`TensorFile` for factor files)."""
    p = as_lake_path(path)
    if not p.is_file():
        raise MissingArtifactError(f"no safetensors file at {p}")
    if is_remote(p):  # safetensors reads local files only: read it tensor by tensor
        with TensorFile(p, device) as tf:
            return {name: tf[name] for name in tf}, dict(tf.metadata)
    with safe_open(str(p), framework="pt", device=device) as fh:
        metadata = dict(fh.metadata() or {})
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    return tensors, metadata


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read only the metadata header (cheap: tensors are not loaded)."""
    p = as_lake_path(path)
    if not p.is_file():
        raise MissingArtifactError(f"no safetensors file at {p}")
    if is_remote(p):
        with TensorFile(p) as tf:
            return dict(tf.metadata)
    with safe_open(str(p), framework="pt") as fh:
        return dict(fh.metadata() or {})


def update_content_digest(digest: Any, path: str | os.PathLike[str]) -> None:
    """Feed a file's content (metadata as sorted JSON, then each tensor's name and bytes in
    name order) into ``digest`` (a ``hashlib`` object), one tensor in memory at a time.
    Independent of the file's tensor order; the same bytes ``defs.automation.safetensors_version``
    hashes after loading the whole file."""
    with TensorFile(path) as tf:
        digest.update(json.dumps(tf.metadata, sort_keys=True).encode())
        for name in sorted(tf):
            digest.update(name.encode())
            digest.update(_raw_bytes(tf[name]))
