"""Our engine's phases on the benchmark workload, each measured by a :class:`Meter`.

``engine`` is the engine package (default ``msif_assets.engine``); any package with the same
public verbs can be passed (``run_bench --engine``), e.g. a scratch copy with a candidate
optimisation, to measure it with exactly this harness.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from types import ModuleType

import msif_assets.engine as default_engine

from .measure import Meter, Phase
from .workload import Data, Workload


@dataclass
class OurResult:
    """Phases, and the score matrices (N candidates, Q queries; sign: +∇log p)."""

    phases: list[Phase] = field(default_factory=list)
    ss_if: torch.Tensor | None = None
    ms_if: torch.Tensor | None = None
    lambda_mean: dict[str, float] = field(default_factory=dict)


def fit_factor_phases(
    E: ModuleType, meter: "Meter | _Unmeasured", model: nn.Module, specs: list, examples, args, label: str,
    phases: list[Phase],
):
    """Covariance → eigendecomposition → Λ, each phase measured separately."""
    with meter.phase(f"covariance{label}") as p:
        cov = E.fit_covariance(model, specs, examples, args)
    phases.append(p)
    with meter.phase(f"eigendecomposition{label}") as p:
        basis = E.eigendecompose(cov, specs, args.split_heads)
    phases.append(p)
    with meter.phase(f"lambda{label}") as p:
        lam = E.fit_lambdas(model, specs, basis, examples, args)
    phases.append(p)
    return E.assemble_factors(specs, basis, lam, E.factor_metadata(specs, args, cov, lam))


def run_ours(
    meter: Meter, w: Workload, model: nn.Module, ft_model: nn.Module, specs: list, data: Data,
    E: ModuleType = default_engine, stats_dtype: str = "auto",
) -> OurResult:
    """SS-IF on ``model`` (the kronfluence-comparable setting) and MS-IF with ``model`` as θ_pt
    and ``ft_model`` as θ_ft (factors fitted on ``data.ft_fit``)."""
    out = OurResult()
    damping = E.Damping("absolute", w.damping)
    args = E.FactorArgs(labels="sampled", seed=w.seed, split_heads=False, batch_size=w.batch_size, pad_id=0,
                        stats_dtype=stats_dtype)

    factors = fit_factor_phases(E, meter, model, specs, data.fit, args, "", out.phases)
    out.lambda_mean = {name: float(v.mean()) for name, v in factors.lambdas.items()}

    with meter.phase("query gradients + precondition (SS-IF)") as p:
        grads = E.sequence_gradients(model, specs, data.queries, batch_size=w.batch_size)
        v_ss = E.preconditioned_queries("ss-if", grads, None, factors, damping)
    out.phases.append(p)
    with meter.phase("pairwise scoring (SS-IF)", note=f"{w.n_candidates} candidates x {w.n_queries} queries") as p:
        out.ss_if = E.score_examples(model, specs, v_ss, data.candidates, batch_size=w.batch_size).total
    out.phases.append(p)

    # MS-IF: a second factor set on the "fine-tuned" copy, then P_pt P_ft on the queries.
    with meter.phase("ft factors (MS-IF, cov+eig+lambda)", note=f"{w.n_ft_fit} sequences on θ_ft") as p:
        ft_factors = fit_factor_phases(E, _Unmeasured(), ft_model, specs, data.ft_fit, args, " [ft]", [])
    out.phases.append(p)
    with meter.phase("query gradients + precondition (MS-IF)") as p:
        ft_grads = E.sequence_gradients(ft_model, specs, data.queries, batch_size=w.batch_size)
        v_ms = E.preconditioned_queries("ms-if", ft_grads, factors, ft_factors, damping)
    out.phases.append(p)
    with meter.phase("pairwise scoring (MS-IF)", note=f"{w.n_candidates} candidates x {w.n_queries} queries, θ_pt") as p:
        out.ms_if = E.score_examples(model, specs, v_ms, data.candidates, batch_size=w.batch_size).total
    out.phases.append(p)

    # Fusing scoring passes: SS-IF and MS-IF vectors stacked along Q, one traversal for both.
    stacked = {name: torch.cat([v_ss[name], v_ms[name]]) for name in v_ss}
    with meter.phase(STACKED, note=f"{w.n_candidates} candidates x {2 * w.n_queries} queries, one pass") as p:
        both = E.score_examples(model, specs, stacked, data.candidates, batch_size=w.batch_size).total
    separate = torch.cat([out.ss_if, out.ms_if], dim=1)
    p.extra["max_rel_diff_vs_separate_passes"] = float((both - separate).abs().max() / separate.abs().max())
    out.phases.append(p)
    return out


STACKED = "pairwise scoring (SS-IF + MS-IF stacked)"


class _Unmeasured:
    """Stands in for a Meter inside a phase that is already being measured (no nested resets)."""

    @contextmanager
    def phase(self, name: str, engine: str = "msif", note: str = "") -> Iterator[Phase]:
        yield Phase(name, engine=engine, note=note)
