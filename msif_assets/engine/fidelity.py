"""EK-FAC fidelity: how well approximate influence ranks agree with exact damped-GGN influence
(the shape of Bao et al.'s Table 1), on one small model and its own training data."""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch
from torch import nn

from .batching import LMExample
from .exact import exact_ggn, exact_influence, flatten_gradients
from .influence import FactorArgs, fit_factors, preconditioned_queries, score_examples, sequence_gradients
from .metrics import pearson, spearman
from .modules import discover_modules
from .precondition import Damping
from .traversal import Progress


@dataclass(frozen=True)
class FidelityRow:
    method: str  # "exact", "exact-blockdiag", "ekfac", "ekfac-unsplit", "ekfac-mlp", "gdp"
    damping: float
    spearman: float  # mean over queries of the per-query rank correlation
    pearson: float
    seconds: float  # fitting (where any) + scoring time of this method


def _mean_correlation(pred: torch.Tensor, truth: torch.Tensor, fn) -> float:
    """Mean over queries (columns) of ``fn(pred[:, q], truth[:, q])``; NaN if any query's is."""
    values = [fn(pred[:, q], truth[:, q]) for q in range(truth.shape[1])]
    return float(sum(values) / len(values))


def fidelity_table(
    model: nn.Module,
    fit_examples: Sequence[LMExample],
    queries: Sequence[LMExample],
    candidates: Sequence[LMExample],
    dampings: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    fisher_repeats: int = 4,
    seed: int = 0,
) -> list[FidelityRow]:
    """Spearman/Pearson of each method against exact damped-GGN influence, per absolute damping.

    EK-FAC factors use sampled labels; ``fisher_repeats`` passes over the fitting data reduce
    the Monte-Carlo noise of that estimate (the exact GGN is its expectation).

    ``exact-blockdiag`` keeps only the exact GGN's per-module diagonal blocks: the ceiling of
    any per-module approximation (EK-FAC included), which separates what the cross-module
    coupling costs from what the Kronecker-factored eigenbasis costs.
    """
    specs = discover_modules(model, "all")
    mlp_specs = [s for s in specs if s.group == "mlp"]
    fit = list(fit_examples) * fisher_repeats
    fits = (("ekfac", specs, True), ("ekfac-unsplit", specs, False), ("ekfac-mlp", mlp_specs, True))
    # a line as each phase starts (the long ones also log their own progress)
    phases = Progress("fidelity: step", 3 + len(fits) + len(dampings))
    step = iter(range(1, phases.total + 1))
    started = time.perf_counter()
    phases.update(next(step), f"gradients of {len(queries)} queries and {len(candidates)} candidates", force=True)
    g_q = sequence_gradients(model, specs, queries)
    g_z = sequence_gradients(model, specs, candidates)
    flat_q, flat_z = flatten_gradients(g_q, specs), flatten_gradients(g_z, specs)
    phases.update(next(step), f"exact GGN over {len(fit_examples)} sequences, {flat_q.shape[1]} parameters", force=True)
    ggn = exact_ggn(model, specs, fit_examples)
    exact_seconds = time.perf_counter() - started
    block_ggn = _module_blocks(ggn, [g_q[s.name][0].numel() for s in specs])

    factor_sets, fit_seconds = {}, {}
    for method, subset, split in fits:
        phases.update(next(step), f"{method} factors over {len(fit)} sequences", force=True)
        t0 = time.perf_counter()
        factor_sets[method] = (subset, fit_factors(model, subset, fit, FactorArgs(seed=seed, split_heads=split)))
        fit_seconds[method] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gdp = flat_z.double() @ flat_q.double().T  # damping-free
    gdp_seconds = time.perf_counter() - t0

    rows: list[FidelityRow] = []
    for damping in dampings:
        phases.update(next(step), f"damping {damping:g}: exact solves and {len(factor_sets)} EK-FAC scorings", force=True)
        t0 = time.perf_counter()
        truth = exact_influence(ggn, flat_q, flat_z, damping)
        rows.append(FidelityRow("exact", damping, 1.0, 1.0, exact_seconds + time.perf_counter() - t0))
        t0 = time.perf_counter()
        blockdiag = exact_influence(block_ggn, flat_q, flat_z, damping)
        rows.append(_row("exact-blockdiag", damping, blockdiag, truth, exact_seconds + time.perf_counter() - t0))
        rows.append(_row("gdp", damping, gdp, truth, gdp_seconds))
        for method, (subset, factors) in factor_sets.items():
            t0 = time.perf_counter()
            vectors = preconditioned_queries("ss-if", {s.name: g_q[s.name] for s in subset}, None, factors, Damping("absolute", damping))
            pred = score_examples(model, subset, vectors, candidates).total
            rows.append(_row(method, damping, pred, truth, fit_seconds[method] + time.perf_counter() - t0))
    phases.update(next(step), "done", force=True)
    return rows


def _module_blocks(ggn: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(P, P) → the same matrix with every cross-module block zeroed (``sizes`` sum to P)."""
    bounds = list(accumulate(sizes, initial=0))
    return torch.block_diag(*(ggn[a:b, a:b] for a, b in zip(bounds, bounds[1:])))


def _row(method: str, damping: float, pred: torch.Tensor, truth: torch.Tensor, seconds: float) -> FidelityRow:
    pred, truth = pred.double().cpu(), truth.double().cpu()
    return FidelityRow(method, damping, _mean_correlation(pred, truth, spearman), _mean_correlation(pred, truth, pearson), seconds)
