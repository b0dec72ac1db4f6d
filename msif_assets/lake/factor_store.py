"""safetensors files for factors and preconditioned query gradients, written and read one
tensor at a time.

A file holds named tensors plus a flat ``str -> str`` metadata header (model
fingerprint, module list, damping, token/sequence counts, dtype...). Structured
metadata values should be JSON-encoded by the caller (``json.dumps``). Only safetensors is
ever read, never pickle.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length ``N``, ``N`` bytes of JSON ``{"__metadata__": {...}, name: {"dtype", "shape",
"data_offsets": [begin, end]}, ...}`` padded with spaces to a multiple of 8, then the tensors'
raw little-endian bytes back to back (offsets relative to the end of the header).

* :class:`StreamingTensorWriter` writes a file whose tensors are produced one at a time (a
  factor file of a 410M-parameter model is ~10 GB: memory holds one module's tensors, never a
  bytes copy of the file); :func:`save_tensors` is built on it.
* :class:`TensorFile` reads lazily: a ``Mapping[str, Tensor]`` that reads a tensor from disk on
  each lookup (no cache), plus ``view(suffix)`` for the per-module ``<module>::<suffix>`` names.

Files are written atomically (temp file in the same directory + fsync + rename, as
:func:`msif_assets.lake.atomic.atomic_write`): readers see the old file or the new one.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from safetensors import safe_open

from msif_assets.lake.atomic import _fsync_dir, _temp_sibling

__all__ = [
    "save_tensors", "load_tensors", "read_metadata", "MissingArtifactError", "StreamingTensorWriter", "TensorFile",
    "PlannedTensor", "update_content_digest",
]

_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _CODES[getattr(torch, _name)] = _code
_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in _CODES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit


class MissingArtifactError(FileNotFoundError):
    """A factor, statistics or query-gradient file for the current models is not written yet:
    the step that writes it has not run since the models changed (the runner retries the
    reading step once it has)."""


class PlannedTensor(NamedTuple):
    """One tensor of a :class:`StreamingTensorWriter` plan."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _checked_metadata(path: object, metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"save_tensors({path}): metadata must map str to str; {key!r} -> {type(value).__name__} "
                "(json.dumps structured values)"
            )
    return meta


def _header_bytes(plan: Sequence[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """Length prefix + JSON header padded with spaces so the data starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in plan:
        end = offset + _nbytes(entry.dtype, entry.shape)
        header[entry.name] = {"dtype": _CODES[entry.dtype], "shape": list(entry.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them (bf16 viewed as uint8)."""
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise NotImplementedError("safetensors files are little-endian; this host is not")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class StreamingTensorWriter:
    """Write a safetensors file whose tensors are produced one at a time, atomically.

    ``plan`` lists every tensor ``(name, dtype, shape)`` in the order they will be written (the
    header is written first, so it must be known up front). Use as a context manager::

        with StreamingTensorWriter(path, [("m::q_a", torch.float64, (n, n)), ...], meta) as out:
            out.write("m::q_a", q_a)            # moved to CPU and written; may be freed now

    ``write`` must follow the plan's order with matching dtype and shape (ValueError
    otherwise; nothing of that tensor is written). On a clean exit every planned tensor must
    have been written (ValueError otherwise); the temp file is then fsynced and renamed onto
    ``path``. On any exception the temp file is removed and the old ``path`` is untouched.
    Keep same-dtype tensors together (or larger item sizes first) so every tensor stays aligned.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        plan: Iterable[tuple[str, torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.plan: list[PlannedTensor] = []
        seen: set[str] = set()
        for name, dtype, shape in plan:
            if not isinstance(name, str):
                raise TypeError(f"StreamingTensorWriter({path}): tensor names must be str, got {name!r}")
            if name in seen or name == "__metadata__":
                raise ValueError(f"StreamingTensorWriter({path}): tensor name {name!r} is planned twice or reserved")
            if dtype not in _CODES:
                raise ValueError(f"StreamingTensorWriter({path}): {name!r} has dtype {dtype}, which safetensors cannot store")
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"StreamingTensorWriter({path}): {name!r} has a negative dimension in {dims}")
            seen.add(name)
            self.plan.append(PlannedTensor(name, dtype, dims))
        self.metadata = _checked_metadata(path, metadata)
        self._header = _header_bytes(self.plan, self.metadata)
        self._written = 0
        self._broken = False
        self._tmp: Path | None = None
        self._fh: IO[bytes] | None = None

    def __enter__(self) -> "StreamingTensorWriter":
        if self._fh is not None or self._written:
            raise RuntimeError(f"StreamingTensorWriter({self.path}) can be entered once")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temp_sibling(self.path)
        self._fh = open(self._tmp, "wb")
        try:
            self._fh.write(self._header)
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (any device; copied to CPU when it is not there)."""
        if self._fh is None:
            raise RuntimeError(f"StreamingTensorWriter({self.path}): write() inside a `with` block")
        if self._written >= len(self.plan):
            raise ValueError(f"{self.path}: {name!r} is beyond the plan; all {len(self.plan)} planned tensors are written")
        expected = self.plan[self._written]
        if name != expected.name:
            raise ValueError(
                f"{self.path}: expected {expected.name!r} (tensor {self._written + 1} of {len(self.plan)} in plan order), got {name!r}"
            )
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{self.path}: {name!r} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise ValueError(
                f"{self.path}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}; the plan says {expected.dtype} {expected.shape}"
            )
        data = tensor.detach().to("cpu").contiguous()
        try:
            self._fh.write(_raw_bytes(data))
        except BaseException:
            self._broken = True  # a partly written tensor: never publish this file
            raise
        self._written += 1

    def _discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._fh is None:
            return
        if exc_type is not None:
            self._discard()
            return
        try:
            if self._broken:
                raise RuntimeError(f"{self.path}: a tensor write failed; the file is not published")
            if self._written != len(self.plan):
                missing = [e.name for e in self.plan[self._written:]]
                raise ValueError(f"{self.path}: {len(missing)} planned tensors were never written: {missing[:5]}")
            fh, tmp = self._fh, self._tmp
            assert tmp is not None
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            self._fh = None
            os.replace(tmp, self.path)
        except BaseException:
            self._discard()
            raise
        _fsync_dir(self.path.parent)


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Atomically write ``tensors`` (each moved to CPU and made contiguous as it is written, so
    memory never holds a second copy of the whole set) with ``metadata``.

    Tensors are stored largest item size first, then by name (every tensor stays aligned).
    Raises TypeError for a non-string tensor name or metadata key/value.
    """
    meta = _checked_metadata(path, metadata)
    items = list(tensors.items())
    for name, tensor in items:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"save_tensors({path}): expected str -> Tensor, got {name!r} -> {type(tensor).__name__}")
    items.sort(key=lambda item: (-item[1].element_size(), item[0]))
    with StreamingTensorWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in items], meta) as out:
        for name, tensor in items:
            out.write(name, tensor)
    return Path(path)


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


def _parse_header(fh: IO[bytes], path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid safetensors file: {why}")

    size = os.fstat(fh.fileno()).st_size
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
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingArtifactError(f"no safetensors file at {self.path}")
        self.device = torch.device(device)
        self._fh: IO[bytes] = open(self.path, "rb", buffering=0)
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
    p = Path(path)
    if not p.is_file():
        raise MissingArtifactError(f"no safetensors file at {p}")
    with safe_open(str(p), framework="pt", device=device) as fh:
        metadata = dict(fh.metadata() or {})
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    return tensors, metadata


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read only the metadata header (cheap: tensors are not loaded)."""
    p = Path(path)
    if not p.is_file():
        raise MissingArtifactError(f"no safetensors file at {p}")
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
