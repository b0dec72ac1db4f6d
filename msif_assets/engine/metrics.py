"""Evaluation metrics for the paper's analyses (METHOD.md, "Analyses").

* Fact tracing: reciprocal rank and Recall@k in both common definitions (per query; the
  pipeline averages them).
* Ranking: :func:`rank_by_score` with deterministic tie-breaking.
* Fidelity: Spearman / Pearson of approximate scores against a ground truth.
* Euclidean proximity of two parameter sets, ``‖a − b‖₂ / ‖a‖₂``.
* The share of |influence| carried by MLP vs attention modules.

Pure numpy / scipy / torch; arrays may be numpy arrays, torch tensors or sequences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import stats

__all__ = [
    "influence_share",
    "pearson",
    "rank_by_score",
    "recall_at_k_any",
    "recall_at_k_fraction",
    "reciprocal_rank",
    "relative_distance",
    "spearman",
]


def _as_float_array(x: object, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array, rejecting NaN/inf."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_ranking(ranked_ids: Sequence[str], gold: set[str]) -> None:
    if not gold:
        raise ValueError("gold set is empty: the metric is undefined for a query without gold")
    if len(set(ranked_ids)) != len(ranked_ids):
        raise ValueError("ranked_ids contains duplicate ids")


# --------------------------------------------------------------------------- ranking


def rank_by_score(
    ids: Sequence[str], scores: Sequence[float] | np.ndarray | torch.Tensor, descending: bool = True
) -> list[str]:
    """Order ``ids`` (N,) by ``scores`` (N,).

    Ties are broken by id in ascending string order, whatever ``descending`` says, so the
    same scores always give the same ranking (independent of input order).
    """
    arr = _as_float_array(scores, "scores").reshape(-1)
    if len(ids) != arr.shape[0]:
        raise ValueError(f"{len(ids)} ids but {arr.shape[0]} scores")
    if len(set(ids)) != len(ids):
        raise ValueError("ids contains duplicates")
    key = -arr if descending else arr
    order = sorted(range(len(ids)), key=lambda i: (key[i], ids[i]))
    return [ids[i] for i in order]


# ------------------------------------------------------------------ fact tracing


def reciprocal_rank(ranked_ids: Sequence[str], gold: set[str]) -> float:
    """1 / (1-based rank of the first gold id in ``ranked_ids``); 0.0 if no gold is ranked."""
    _check_ranking(ranked_ids, gold)
    for position, doc_id in enumerate(ranked_ids, start=1):
        if doc_id in gold:
            return 1.0 / position
    return 0.0


def recall_at_k_any(ranked_ids: Sequence[str], gold: set[str], k: int = 10) -> float:
    """"Any" Recall@k: 1.0 if at least one gold id is in the top ``k``, else 0.0."""
    _check_ranking(ranked_ids, gold)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 1.0 if any(doc_id in gold for doc_id in ranked_ids[:k]) else 0.0


def recall_at_k_fraction(ranked_ids: Sequence[str], gold: set[str], k: int = 10) -> float:
    """"Fraction" Recall@k: |gold ∩ top k| / |gold|.

    The denominator is |gold| (not min(|gold|, k)), so a query with more than ``k`` gold
    documents cannot reach 1.0. Gold ids absent from ``ranked_ids`` count as misses.
    """
    _check_ranking(ranked_ids, gold)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = sum(1 for doc_id in ranked_ids[:k] if doc_id in gold)
    return hits / len(gold)


# ------------------------------------------------------------------ correlations


def _paired(x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    a = _as_float_array(x, "x").reshape(-1)
    b = _as_float_array(y, "y").reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"x has {a.size} values but y has {b.size}")
    if a.size < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {a.size}")
    return a, b


def _is_constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0]))


def spearman(x: object, y: object) -> float:
    """Spearman rank correlation of two equal-length 1-D inputs (flattened if not 1-D).

    Returns NaN (without a warning) when either input is constant: the correlation is
    undefined there. Raises ``ValueError`` on length mismatch, < 2 pairs or NaN/inf.
    """
    a, b = _paired(x, y)
    if _is_constant(a) or _is_constant(b):
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def pearson(x: object, y: object) -> float:
    """Pearson correlation; same input rules and constant-input NaN as :func:`spearman`."""
    a, b = _paired(x, y)
    if _is_constant(a) or _is_constant(b):
        return math.nan
    return float(stats.pearsonr(a, b).statistic)


# ------------------------------------------------------------- parameter geometry


def relative_distance(
    params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor]
) -> float:
    """``‖a − b‖₂ / ‖a‖₂`` over the keys both mappings share, accumulated in float64.

    With ``a = θ_pt`` and ``b = θ_ft`` this is the paper's Euclidean-proximity number.
    Keys present in only one mapping are ignored; raises if none are shared, if any shared
    key has mismatched shapes (all such keys are listed), or if ``‖a‖₂ = 0``.
    """
    shared = sorted(set(params_a) & set(params_b))
    if not shared:
        raise ValueError("params_a and params_b share no keys")
    mismatched = [
        f"{k}: {tuple(params_a[k].shape)} vs {tuple(params_b[k].shape)}"
        for k in shared
        if params_a[k].shape != params_b[k].shape
    ]
    if mismatched:
        raise ValueError("shape mismatch for shared keys: " + "; ".join(mismatched))
    diff_sq = 0.0
    norm_sq = 0.0
    for k in shared:
        a = params_a[k].detach().to("cpu", torch.float64)
        b = params_b[k].detach().to("cpu", torch.float64)
        diff_sq += float(torch.sum((a - b) ** 2))
        norm_sq += float(torch.sum(a**2))
    if norm_sq == 0.0:
        raise ValueError("‖params_a‖₂ is zero: relative distance undefined")
    return math.sqrt(diff_sq) / math.sqrt(norm_sq)


# --------------------------------------------------------------- influence share


def influence_share(
    score_mlp: object,
    score_attn: object,
    param_count_mlp: int | None = None,
    param_count_attn: int | None = None,
) -> dict[str, float]:
    """Share of |influence| carried by MLP vs attention modules.

    Each element of ``score_mlp`` / ``score_attn`` (any shapes, e.g. (M_mlp, N, Q) and
    (M_attn, N, Q)) is one contribution; the share is the sum of absolute contributions
    of one group over the total of both groups. Pass per-module contributions (not sums
    over modules) to get the per-module definition: summing first lets modules of a group
    cancel each other.

    Returns ``abs_influence_mlp``, ``abs_influence_attn``, ``influence_share_mlp``,
    ``influence_share_attn`` and, when both parameter counts are given,
    ``param_share_mlp`` and ``param_share_attn`` (count / total count).
    """
    mlp = float(np.abs(_as_float_array(score_mlp, "score_mlp")).sum())
    attn = float(np.abs(_as_float_array(score_attn, "score_attn")).sum())
    total = mlp + attn
    if total == 0.0:
        raise ValueError("all contributions are zero: influence share undefined")
    out = {
        "abs_influence_mlp": mlp,
        "abs_influence_attn": attn,
        "influence_share_mlp": mlp / total,
        "influence_share_attn": attn / total,
    }
    if (param_count_mlp is None) != (param_count_attn is None):
        raise ValueError("give both parameter counts or neither")
    if param_count_mlp is not None and param_count_attn is not None:
        if param_count_mlp < 0 or param_count_attn < 0 or param_count_mlp + param_count_attn == 0:
            raise ValueError("parameter counts must be >= 0 with a positive total")
        n_total = param_count_mlp + param_count_attn
        out["param_share_mlp"] = param_count_mlp / n_total
        out["param_share_attn"] = param_count_attn / n_total
    return out
