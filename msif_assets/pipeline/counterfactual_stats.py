"""Statistics of the counterfactual evaluation: Δ log p and answer flips of removal retrains,
LDS of each method, bootstrap intervals over queries, the retraining noise floor; markdown
tables and plots. Plain functions over the retrained models' measured outputs.

Definitions (per query q of the evaluated set):

* ``delta_logp`` = log p(answer | prompt) of the run's fine-tuned model − the same under the
  ``none`` retrain (every document kept, same seed). ``flipped``: the run's greedy answer
  differs from the ``none`` retrain's. Means over queries, with percentile bootstrap intervals
  (queries resampled with replacement, ``bootstrap`` times, at ``confidence``).
* LDS of a method: mean over queries of Spearman ρ between, across the LDS subsets, the
  measured log p and Σ_{z ∈ subset} score(z, q). A query whose measured or predicted values are
  constant across subsets has no ρ and is left out (``n_queries`` counts those kept). Two
  intervals: over queries (as asked of LDS), and over subsets (resampling the subsets, which all
  queries share; usually the wider one, since the subsets are one draw for every query).
* Noise floor: ``reseed`` rows. Removal: the ``none`` corpus retrained with another seed
  (Δ and flips caused by the seed alone). LDS: ρ between two seeds' measured log p on the same
  subsets — what a perfect predictor of one seed's outputs reaches on the other's.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from ..engine import Damping


def bootstrap_ci(values: Sequence[float], n: int, confidence: float, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval of the mean of ``values`` (queries resampled); (None, None) when
    there are fewer than two values or ``n`` is 0."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) < 2 or n < 1:
        return None, None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def _mean(values: Sequence[float]) -> float | None:
    x = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(x)) if x else None


# ------------------------------------------------------------------ top-k removal


def removal_summary(outputs: Mapping[str, Mapping[str, dict]], runs: Sequence, n_removed: Mapping[str, int],
                    train_seconds: Mapping[str, float], n_boot: int, confidence: float, seed: int = 0) -> list[dict]:
    """One row per run (``Run`` from ``counterfactual``) against the ``none`` run.

    ``outputs[run_key][query_id]``: ``{"logp", "greedy", "correct"}``."""
    base_key = next((r.key for r in runs if r.kind == "baseline"), None)
    if base_key is None or base_key not in outputs:
        raise ValueError("the 'none' retrain (nothing removed) is missing: it is the reference of every Δ")
    base = outputs[base_key]
    queries = sorted(base)
    rows = []
    for run in runs:
        out = outputs[run.key]
        missing = [q for q in queries if q not in out]
        if missing:
            raise ValueError(f"run {run.key}: no output for queries {missing[:5]}; re-materialize its partition")
        delta = [out[q]["logp"] - base[q]["logp"] for q in queries]
        flips = [float(out[q]["greedy"] != base[q]["greedy"]) for q in queries]
        lo, hi = bootstrap_ci(delta, n_boot, confidence, seed)
        flo, fhi = bootstrap_ci(flips, n_boot, confidence, seed)
        d = run.damping
        rows.append({
            "run_key": run.key, "kind": run.kind, "method": run.method, "damping_kind": None if d is None else d.mode,
            "damping": None if d is None else d.value, "k": run.k, "seed": run.seed, "n_queries": len(queries),
            "n_removed": int(n_removed.get(run.key, 0)), "mean_delta_logp": _mean(delta), "delta_ci_lo": lo,
            "delta_ci_hi": hi, "mean_abs_delta_logp": _mean([abs(x) for x in delta]),
            "frac_logp_down": _mean([float(x < 0) for x in delta]), "flip_rate": _mean(flips), "flip_ci_lo": flo,
            "flip_ci_hi": fhi, "accuracy": _mean([float(out[q]["correct"]) for q in queries]),
            "train_seconds": train_seconds.get(run.key),
        })
    return rows


# ------------------------------------------------------------------ LDS


def per_query_spearman(measured: np.ndarray, predicted: np.ndarray) -> list[float | None]:
    """``measured``, ``predicted``: (subsets, queries). Spearman ρ per query column (Pearson
    correlation of average ranks, as ``scipy.stats.spearmanr``); None where undefined (fewer
    than 3 subsets, or a constant column)."""
    rm, rp = rankdata(measured, axis=0), rankdata(predicted, axis=0)
    rm, rp = rm - rm.mean(axis=0), rp - rp.mean(axis=0)
    denom = np.sqrt((rm ** 2).sum(axis=0) * (rp ** 2).sum(axis=0))
    ok = (denom > 0) & (measured.shape[0] >= 3)
    rho = np.where(ok, (rm * rp).sum(axis=0) / np.where(ok, denom, 1.0), np.nan)
    return [float(r) if ok_j and math.isfinite(r) else None for r, ok_j in zip(rho, ok)]


def subset_bootstrap_ci(measured: np.ndarray, predicted: np.ndarray, n: int, confidence: float,
                        seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval of the mean ρ over queries when the *subsets* are resampled with
    replacement: the uncertainty from having drawn these subsets, which every query shares
    (the interval over queries treats the queries as independent and does not see it)."""
    if n < 1 or measured.shape[0] < 3:
        return None, None
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n):
        rows = rng.integers(0, measured.shape[0], size=measured.shape[0])
        kept = [r for r in per_query_spearman(measured[rows], predicted[rows]) if r is not None]
        if kept:
            means.append(float(np.mean(kept)))
    if len(means) < 2:
        return None, None
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def lds_predictions(members: np.ndarray, scores: Mapping[str, Mapping[str, float]], query_ids: Sequence[str],
                    doc_ids: Sequence[str]) -> np.ndarray:
    """(subsets, queries): Σ over each subset's documents of the query's scores (unscored = 0).
    ``members``: (subsets, documents) 0/1 in ``doc_ids`` order."""
    col = {d: i for i, d in enumerate(doc_ids)}
    s = np.zeros((len(doc_ids), len(query_ids)))
    for j, q in enumerate(query_ids):
        for d, v in scores.get(q, {}).items():
            if d in col:
                s[col[d], j] = v
    return members @ s


def lds_rows(measured: np.ndarray, members: np.ndarray, method_scores: Mapping[tuple[str, Damping | None], Mapping],
             query_ids: Sequence[str], doc_ids: Sequence[str], n_boot: int, confidence: float,
             seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(summary rows, per-query rows) of every method's LDS."""
    summary, per_query = [], []
    for (method, damping), scores in method_scores.items():
        predicted = lds_predictions(members, scores, query_ids, doc_ids)
        rho = per_query_spearman(measured, predicted)
        cols = {"method": method, "damping_kind": None if damping is None else damping.mode,
                "damping": None if damping is None else damping.value}
        per_query += [{**cols, "query_id": q, "spearman": r, "n_subsets": measured.shape[0]} for q, r in zip(query_ids, rho)]
        summary.append({**cols, **_lds_stats(rho, measured, predicted, n_boot, confidence, seed)})
    return summary, per_query


def reseed_rows(pairs: Mapping[int, tuple[np.ndarray, np.ndarray]], query_ids: Sequence[str], n_boot: int,
                confidence: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The noise floor: per extra seed, ρ between the main seed's and that seed's measured log p
    on the same subsets (``pairs[seed] = (main, other)``, each (subsets, queries))."""
    summary, per_query = [], []
    for other_seed, (main, other) in sorted(pairs.items()):
        rho = per_query_spearman(main, other)
        cols = {"method": "reseed", "damping_kind": None, "damping": None}
        per_query += [{**cols, "query_id": q, "spearman": r, "n_subsets": main.shape[0], "seed": other_seed}
                      for q, r in zip(query_ids, rho)]
        summary.append({**cols, "seed": other_seed, **_lds_stats(rho, main, other, n_boot, confidence, seed)})
    return summary, per_query


def _lds_stats(rho: Sequence[float | None], measured: np.ndarray, predicted: np.ndarray, n_boot: int, confidence: float,
               seed: int) -> dict:
    kept = [r for r in rho if r is not None]
    lo, hi = bootstrap_ci(kept, n_boot, confidence, seed)
    slo, shi = subset_bootstrap_ci(measured, predicted, n_boot, confidence, seed)
    return {"lds": _mean(kept), "ci_lo": lo, "ci_hi": hi, "ci_lo_subsets": slo, "ci_hi_subsets": shi,
            "n_queries": len(kept), "n_subsets": measured.shape[0]}


# ------------------------------------------------------------------ presentation


def _fmt(v, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _label(r: Mapping) -> str:
    if r["damping"] is None:
        return r["method"]
    return f"{r['method']}@{'rel' if r['damping_kind'] == 'relative' else 'abs'}:{r['damping']:g}"


def removal_markdown(rows: Sequence[Mapping]) -> str:
    lines = ["| run | k | removed | Δ log p (mean) | 95% CI | mean abs Δ | share down | flip rate | flip CI | accuracy | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = _label(r) + ("" if r["kind"] != "reseed" else f" (seed {r['seed']})")
        lines.append(f"| {name} | {r['k'] or '—'} | {r['n_removed']} | {_fmt(r['mean_delta_logp'])} | "
                     f"[{_fmt(r['delta_ci_lo'])}, {_fmt(r['delta_ci_hi'])}] | {_fmt(r['mean_abs_delta_logp'])} | "
                     f"{_fmt(r['frac_logp_down'], '.2f')} | {_fmt(r['flip_rate'], '.3f')} | "
                     f"[{_fmt(r['flip_ci_lo'], '.3f')}, {_fmt(r['flip_ci_hi'], '.3f')}] | {_fmt(r['accuracy'], '.3f')} | "
                     f"{_fmt(r['train_seconds'], '.0f')} |")
    return "\n".join(lines)


def lds_markdown(rows: Sequence[Mapping]) -> str:
    lines = ["| method | LDS (mean Spearman) | CI over queries | CI over subsets | queries | subsets |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = _label(r) if r["method"] != "reseed" else f"noise ceiling: seed {r['seed']} vs main seed"
        lines.append(f"| {name} | {_fmt(r['lds'])} | [{_fmt(r['ci_lo'])}, {_fmt(r['ci_hi'])}] | "
                     f"[{_fmt(r.get('ci_lo_subsets'))}, {_fmt(r.get('ci_hi_subsets'))}] | {r['n_queries']} | {r['n_subsets']} |")
    return "\n".join(lines)


def plot_removals(rows: Sequence[Mapping], path) -> None:
    """PNG: mean Δ log p (with CI) and flip rate against k, one line per method; gold and the
    reseed noise as horizontal references."""
    from matplotlib.figure import Figure

    from matplotlib import colormaps

    colors = colormaps["tab20"]  # > 10 methods: tab10 would repeat colours
    fig = Figure(figsize=(13, 5))
    axes = fig.subplots(1, 2)
    lines: dict[str, list] = {}
    for r in rows:
        if r["k"] is not None:
            lines.setdefault(_label(r), []).append(r)
    for n, (name, group) in enumerate(sorted(lines.items())):
        group = sorted(group, key=lambda r: r["k"])
        ks = [r["k"] for r in group]
        style = {"color": colors(n % 20), "marker": "o", "linestyle": "--" if "random" in name else "-"}
        axes[0].plot(ks, [r["mean_delta_logp"] for r in group], label=name, **style)
        axes[0].fill_between(ks, [r["delta_ci_lo"] if r["delta_ci_lo"] is not None else r["mean_delta_logp"] for r in group],
                             [r["delta_ci_hi"] if r["delta_ci_hi"] is not None else r["mean_delta_logp"] for r in group],
                             color=style["color"], alpha=0.08)
        axes[1].plot(ks, [r["flip_rate"] for r in group], label=name, **style)
    for r in rows:
        if r["method"] == "gold" or r["kind"] == "reseed":
            text = "gold removed" if r["method"] == "gold" else f"reseed {r['seed']}"
            ls = ":" if r["method"] == "gold" else "-."
            axes[0].axhline(r["mean_delta_logp"], color="k", linestyle=ls, linewidth=1, label=text)
            axes[1].axhline(r["flip_rate"], color="k", linestyle=ls, linewidth=1, label=text)
    for ax, title in zip(axes, ("mean Δ log p(answer) vs none retrain", "greedy answer flip rate")):
        ax.set_xscale("log")
        ax.set_xlabel("k (top-k per query, union over queries)")
        ax.set_title(title)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=72)


def plot_lds(rows: Sequence[Mapping], path) -> None:
    """PNG: LDS (with CI) against damping for MS-IF/SS-IF; undamped methods dashed; the
    reseed ceiling dotted."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    damped: dict[tuple, list] = {}
    for r in rows:
        if r["damping"] is not None:
            damped.setdefault((r["method"], r["damping_kind"]), []).append(r)
    n = 0
    for (method, kind), group in sorted(damped.items()):
        group = sorted(group, key=lambda r: r["damping"])
        ax.errorbar([r["damping"] for r in group], [r["lds"] for r in group], fmt="o-", color=f"C{n}", capsize=3,
                    yerr=[[r["lds"] - (r["ci_lo"] if r["ci_lo"] is not None else r["lds"]) for r in group],
                          [(r["ci_hi"] if r["ci_hi"] is not None else r["lds"]) - r["lds"] for r in group]],
                    label=f"{method} ({kind})")
        n += 1
    for r in rows:
        if r["damping"] is None and r["lds"] is not None:
            reseed = r["method"] == "reseed"
            ax.axhline(r["lds"], linestyle=":" if reseed else (0, (4, 1 + n)), linewidth=1.5, color="k" if reseed else f"C{n % 10}",
                       label=f"noise ceiling (seed {r['seed']})" if reseed else r["method"])
            n += 0 if reseed else 1
    if damped:
        ax.set_xscale("log")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("damping (kind in legend)")
    ax.set_ylabel("LDS (mean Spearman over queries)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=72)
