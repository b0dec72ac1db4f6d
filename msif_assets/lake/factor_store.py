"""safetensors files for factors and preconditioned query gradients.

A file holds named tensors plus a flat ``str -> str`` metadata header (model
fingerprint, module list, damping, token/sequence counts, dtype...). Structured
metadata values should be JSON-encoded by the caller (``json.dumps``). Files are
written atomically (temp file + rename); only safetensors is ever read, never pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from msif_assets.lake.atomic import atomic_write

__all__ = ["save_tensors", "load_tensors", "read_metadata", "MissingArtifactError"]


class MissingArtifactError(FileNotFoundError):
    """A factor, statistics or query-gradient file for the current models is not written yet:
    the step that writes it has not run since the models changed (the runner retries the
    reading step once it has)."""


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) with ``metadata``.

    Raises TypeError for a non-string tensor name or metadata key/value.
    """
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"save_tensors({path}): metadata must map str to str; {key!r} -> {type(value).__name__} "
                "(json.dumps structured values)"
            )
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"save_tensors({path}): expected str -> Tensor, got {name!r} -> {type(tensor).__name__}")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        prepared[name] = t
    return atomic_write(path, lambda tmp: save_file(prepared, str(tmp), metadata=meta))


def load_tensors(
    path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata header of a safetensors file."""
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
