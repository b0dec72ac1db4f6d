"""Memory a step will need, checked before it computes: a setting that cannot fit is a clear
error naming the setting to change, not an out-of-memory kill halfway through."""

from __future__ import annotations

import os

from ..engine import ModuleSpec
from .settings import ComputeSettings

HEADROOM = 0.8  # of the memory available now: the model, activations and the rest need some


class MemoryBudgetError(ValueError):
    """A step's working set under the current settings exceeds the memory available."""


def available_bytes() -> int:
    """MemAvailable (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def query_block_bytes(specs: list[ModuleSpec], settings: ComputeSettings, n_queries: int) -> int:
    """Peak bytes of one query block: its per-module gradients (Q, m, n), one method's
    preconditioned copy and the float64 intermediates of one module's preconditioning."""
    block = min(settings.query_batch_size or n_queries, n_queries)
    itemsize = 8 if settings.dtype == "float64" else 4
    params = sum(s.d_out * s.d_in for s in specs)
    largest = max(s.d_out * s.d_in for s in specs)
    return block * (2 * params * itemsize + 2 * largest * 8)


def check_query_block_fits(specs: list[ModuleSpec], settings: ComputeSettings, n_queries: int, step: str) -> None:
    need, have = query_block_bytes(specs, settings, n_queries), available_bytes()
    if need > HEADROOM * have:
        per_query = query_block_bytes(specs, settings, 1)
        fits = int(HEADROOM * have // per_query)
        advice = (f"set [compute] query_batch_size = {fits}" if fits >= 1 else
                  "even one query does not fit: track fewer modules ([compute] scope = \"mlp\") or use a larger machine")
        raise MemoryBudgetError(
            f"{step}: a block of {min(settings.query_batch_size or n_queries, n_queries)} queries needs about "
            f"{need / 2**20:,.1f} MiB for the query gradients of {sum(s.d_out * s.d_in for s in specs):,} tracked parameters, "
            f"but {have / 2**20:,.1f} MiB is available; {advice}"
        )
