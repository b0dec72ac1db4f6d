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


def _vector_numbers(spec: ModuleSpec, rank: int) -> int:
    """Numbers one query's stored vector of this module takes (low-rank factors or dense)."""
    dense = spec.d_out * spec.d_in
    return rank * (spec.d_out + spec.d_in) if 0 < rank and rank * (spec.d_out + spec.d_in) < dense else dense


def _block(settings: ComputeSettings, n_queries: int) -> int:
    return max(min(settings.query_batch_size or n_queries, n_queries), 1)


def _query_step_bytes(specs: list[ModuleSpec], settings: ComputeSettings, max_tokens: int) -> tuple[int, int]:
    """(bytes per query, fixed bytes) of the query_gradients step: per query its gradients (dense
    (m, n), or in token form T(m + n) with ``query_rank``), every score key's stored vectors and
    the float64 working copies of one module's preconditioning; fixed, one module's pre-trained
    and fine-tuned factors (factors are streamed module by module)."""
    itemsize = 8 if settings.dtype == "float64" else 4
    if settings.query_rank > 0:
        gradients = max_tokens * sum(s.d_in + s.d_out for s in specs)
    else:
        gradients = sum(s.d_out * s.d_in for s in specs)
    vectors = len(settings.gradient_keys) * sum(_vector_numbers(s, settings.query_rank) for s in specs)
    working = 3 * max(s.d_out * s.d_in for s in specs) * 8
    factors = 2 * max(s.d_in**2 + s.d_out**2 + s.d_out * s.d_in for s in specs) * 8
    return (gradients + vectors) * itemsize + working, factors


def _scoring_step_bytes(specs: list[ModuleSpec], settings: ComputeSettings, n_candidates: int) -> tuple[int, int]:
    """(bytes per query, fixed bytes) of scoring one shard: every score key's stored vectors and
    the (N, Q, modules) float64 scores of one pass."""
    itemsize, keys = (8 if settings.dtype == "float64" else 4), len(settings.gradient_keys)
    vectors = keys * sum(_vector_numbers(s, settings.query_rank) for s in specs) * itemsize
    return vectors + n_candidates * keys * len(specs) * 8, 0


def query_block_bytes(specs: list[ModuleSpec], settings: ComputeSettings, n_queries: int, max_tokens: int = 0) -> int:
    per_query, fixed = _query_step_bytes(specs, settings, max_tokens)
    return fixed + _block(settings, n_queries) * per_query


def scoring_block_bytes(specs: list[ModuleSpec], settings: ComputeSettings, n_queries: int, n_candidates: int) -> int:
    per_query, fixed = _scoring_step_bytes(specs, settings, n_candidates)
    return fixed + _block(settings, n_queries) * per_query


def _check(per_query: int, fixed: int, settings: ComputeSettings, n_queries: int, step: str, specs: list[ModuleSpec]) -> None:
    """Raise MemoryBudgetError, naming the query_batch_size that fits, when a block exceeds the
    available memory (with headroom)."""
    need, have = fixed + _block(settings, n_queries) * per_query, available_bytes()
    if need <= HEADROOM * have:
        return
    fits = int((HEADROOM * have - fixed) // max(per_query, 1))
    advice = (f"set [compute] query_batch_size = {fits}" if fits >= 1 else
              "even one query does not fit: set [compute] query_rank (e.g. 32), track fewer modules "
              "([compute] scope = \"mlp\") or use a larger machine")
    raise MemoryBudgetError(
        f"{step}: a block of {_block(settings, n_queries)} queries needs about {need / 2**20:,.1f} MiB "
        f"({sum(s.d_out * s.d_in for s in specs):,} tracked parameters, {len(settings.gradient_keys)} score keys, "
        f"query_rank {settings.query_rank or 'full'}), but {have / 2**20:,.1f} MiB is available; {advice}"
    )


def check_query_block_fits(specs: list[ModuleSpec], settings: ComputeSettings, n_queries: int, step: str, max_tokens: int = 0) -> None:
    _check(*_query_step_bytes(specs, settings, max_tokens), settings, n_queries, step, specs)


def check_scoring_block_fits(specs: list[ModuleSpec], settings: ComputeSettings, n_queries: int, n_candidates: int) -> None:
    _check(*_scoring_step_bytes(specs, settings, n_candidates), settings, n_queries, "influence_scores", specs)
