"""Two of the paper's analyses over a model pair: Euclidean proximity of the weights
(§5.2) and the share of influence carried by MLP vs attention parameters (§5.1).

Tables: ``param_proximity`` (tables.PARAM_PROXIMITY) and ``influence_share``
(tables.INFLUENCE_SHARE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import pyarrow as pa
from torch import nn

from ..engine.metrics import influence_share, relative_distance
from ..engine.modules import ModuleSpec, weight_matrix
from .settings import ScoreKey


@dataclass(frozen=True)
class ProximityRow:
    scope: str  # "tracked", "tracked-mlp", "tracked-attn", "all-shared"
    n_tensors: int
    n_params: int
    relative_distance: float  # ‖θ_ft − θ_pt‖₂ / ‖θ_pt‖₂


def parameter_proximity(pt: nn.Module, ft: nn.Module, specs: Sequence[ModuleSpec]) -> list[ProximityRow]:
    """Relative distance over the tracked ``[W | b]`` (all, per group) and all shared parameters
    (same name and shape, e.g. everything but a replaced head)."""
    pt_mods, ft_mods = dict(pt.named_modules()), dict(ft.named_modules())
    rows = []
    for scope, group in (("tracked", None), ("tracked-mlp", "mlp"), ("tracked-attn", "attn")):
        chosen = [s for s in specs if group in (None, s.group)]
        if chosen:
            a = {s.name: weight_matrix(pt_mods[s.name], s) for s in chosen}
            b = {s.name: weight_matrix(ft_mods[s.name], s) for s in chosen}
            rows.append(ProximityRow(scope, len(chosen), sum(s.numel for s in chosen), relative_distance(a, b)))
    pt_params, ft_params = dict(pt.named_parameters()), dict(ft.named_parameters())
    shared = {k: v for k, v in pt_params.items() if k in ft_params and ft_params[k].shape == v.shape}
    rows.append(ProximityRow("all-shared", len(shared), sum(v.numel() for v in shared.values()),
                             relative_distance(shared, {k: ft_params[k] for k in shared})))
    return rows


def tracked_parameter_counts(specs: Sequence[ModuleSpec]) -> dict[str, int]:
    """Parameters (weights + biases) of the tracked modules per group: ``{"mlp": n, "attn": n}``."""
    return {g: sum(s.numel for s in specs if s.group == g) for g in ("mlp", "attn")}


def influence_shares(chunk_scores: pa.Table, param_counts: Mapping[str, int]) -> list[dict]:
    """Per method and damping, the share of Σ|score_mlp| vs Σ|score_attn| over all scored
    (query, chunk) pairs (group totals per pair: modules within a group may cancel), next to
    the parameter share of the tracked MLP vs attention modules."""
    groups: dict[ScoreKey, tuple[list, list]] = {}
    cols = [chunk_scores.column(c).to_pylist() for c in ("method", "damping_kind", "damping", "score_mlp", "score_attn")]
    for method, kind, damping, mlp, attn in zip(*cols):
        if mlp is not None and attn is not None:
            pair = groups.setdefault(ScoreKey.from_columns(method, kind, damping), ([], []))
            pair[0].append(mlp)
            pair[1].append(attn)
    out = []
    for key, (mlp, attn) in sorted(groups.items(), key=lambda kv: kv[0].order):
        if not any(mlp) and not any(attn):
            continue
        share = influence_share(mlp, attn, param_counts["mlp"], param_counts["attn"])
        out.append({**key.columns, "n_pairs": len(mlp), **share,
                    "param_count_mlp": param_counts["mlp"], "param_count_attn": param_counts["attn"]})
    return out


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows])


