"""Two of the paper's analyses over a model pair: Euclidean proximity of the weights
(§5.2) and the share of influence carried by MLP vs attention parameters (§5.1).

Tables: ``param_proximity`` (tables.PARAM_PROXIMITY) and ``influence_share``
(tables.INFLUENCE_SHARE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import pyarrow as pa
import torch
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
    pt_params, ft_params = dict(pt.named_parameters()), dict(ft.named_parameters())
    shared = {k: v for k, v in pt_params.items() if k in ft_params and ft_params[k].shape == v.shape}
    tracked = {f"{s.name}.{p}" for s in specs for p in (("weight", "bias") if s.has_bias else ("weight",))}
    _require_finite_params({"pt": pt_params, "ft": ft_params}, sorted(set(shared) | tracked))
    rows = []
    for scope, group in (("tracked", None), ("tracked-mlp", "mlp"), ("tracked-attn", "attn")):
        chosen = [s for s in specs if group in (None, s.group)]
        if chosen:
            a = {s.name: weight_matrix(pt_mods[s.name], s) for s in chosen}
            b = {s.name: weight_matrix(ft_mods[s.name], s) for s in chosen}
            rows.append(ProximityRow(scope, len(chosen), sum(s.numel for s in chosen), _distance(scope, a, b)))
    rows.append(ProximityRow("all-shared", len(shared), sum(v.numel() for v in shared.values()),
                             _distance("all-shared", shared, {k: ft_params[k] for k in shared})))
    return rows


class ProximityError(ValueError):
    """The relative distance is undefined or non-finite; the message names the tensors."""


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _require_finite_params(models: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Raise naming every parameter (of θ_pt or θ_ft) with NaN/±Inf values: its distance would be nan."""
    bad = []
    for label, params in models.items():
        for name in names:
            t = params.get(name)
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
                n_nan = int(torch.isnan(t.detach()).sum())
                bad.append(f"θ_{label} {name} ({n_nan} NaN, {int((~torch.isfinite(t.detach())).sum()) - n_nan} Inf)")
    if bad:
        raise ProximityError("param_proximity: non-finite parameters, the relative distance would be nan — "
                             + _names(bad) + " — the model's weights are corrupt; re-export it from a healthy checkpoint")


def _distance(scope: str, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``relative_distance(a, b)``, raising with the scope and tensor names where it is undefined
    (‖θ_pt‖ = 0 over the scope) or not finite, instead of returning nan."""
    norms = {k: float(torch.linalg.vector_norm(v.detach().to(torch.float64))) for k, v in a.items()}
    if not any(norms.values()):
        raise ProximityError(
            f"param_proximity, scope {scope!r}: ‖θ_pt‖₂ is zero — every θ_pt tensor of the scope is all zeros "
            f"({_names(sorted(norms))}), so ‖θ_ft − θ_pt‖₂ / ‖θ_pt‖₂ is undefined. Is pretrained_model a real "
            "pre-trained checkpoint (not a zero-initialised or pruned one)? Point pretrained_model at the weights "
            "the fine-tune started from"
        )
    distance = relative_distance(a, b)
    if not math.isfinite(distance):
        diffs = {k: float(torch.linalg.vector_norm((b[k].detach().to(torch.float64) - v.detach().to(torch.float64))))
                 for k, v in a.items()}
        bad = sorted(k for k in a if not (math.isfinite(norms[k]) and math.isfinite(diffs[k])))
        raise ProximityError(f"param_proximity, scope {scope!r}: relative distance is {distance} — non-finite in "
                             f"{_names(bad) or 'the accumulated sums'}; check those tensors in both models")
    return distance


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


