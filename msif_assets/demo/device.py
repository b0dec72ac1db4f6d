"""Where the demo trains: CUDA when present, else CPU with a bounded thread count."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` if available, else ``cpu``; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(requested)


def default_threads() -> int:
    """Cores this process may use (affinity-aware), at most 16: more threads than that slow tiny models."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)`` (default ``default_threads()``), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(previous)
