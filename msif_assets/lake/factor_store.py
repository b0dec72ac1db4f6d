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
* :class:`TensorFile` (``lake/tensor_file.py``) reads lazily: a ``Mapping[str, Tensor]`` that reads
  a tensor on each lookup (no cache), plus ``view(suffix)`` for the per-module ``<module>::<suffix>`` names.

Files are written atomically (temp file in the same directory + fsync + rename, as
:func:`msif_assets.lake.atomic.atomic_write`): readers see the old file or the new one.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, NamedTuple, Sequence

import torch

from msif_assets.lake.atomic import _fsync_dir, _publish, _temp_sibling
from msif_assets.lake.storage import as_lake_path, is_remote

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
        self.path = as_lake_path(path)
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
        if not is_remote(self.path):
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
            _publish(tmp, self.path)
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
    return as_lake_path(path)


# The reading half lives in lake/tensor_file.py; these names stay importable from here.
from msif_assets.lake.tensor_file import TensorFile, load_tensors, read_metadata, update_content_digest  # noqa: E402
