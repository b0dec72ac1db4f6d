"""Counterfactual proof of influence: retrain without what a method blames, and on random subsets.

Two experiments, each a set of *runs*; a run is a training set (the lake's corpus minus a
removal set, or an α-subset) trained by the world's recipe with one seed, then measured on
every lake query (``retrain.measure``):

* **Top-k removal.** For every score group (MS-IF / SS-IF at each damping, GDP, RepSim, BM25)
  and the ``random`` control, and every k in ``ks``: remove from pre-training the *union over
  the evaluated queries* of each query's top-k documents, re-pre-train and re-fine-tune with
  the same seed and schedule. One retrain per (method, k), not per query: per query would cost
  |queries| times more (40 × 14 × 3 = 1680 retrains on the default world instead of 42). The
  union is what a retrain can afford, and each query's own top-k is inside it, so a method
  whose top-k really carries the answer lowers that query's log p; the price is interference
  (another query's removals can move this one), which is the same for every method, and the
  gold run (every evaluated query's gold documents) is the reference. ``none`` is the
  no-removal retrain every Δ is taken against; ``none@seed+i`` (reseed) retrains the full
  corpus with another seed: the change a retrain causes by chance alone.
* **LDS** (Park et al. 2023): ``n_subsets`` random α-fractions of the corpus, each trained the
  same way; per query, Spearman between the measured log p and the sum of the method's scores
  over the subset, averaged over queries. ``noise_subsets`` of them are retrained with other
  seeds (``noise_seeds``): the seed-to-seed Spearman on the same subsets is the ceiling the
  retraining noise leaves to any method.

Document scores are the **sum over the document's chunks** (influence is additive: removing a
document removes all its chunks); a document a method did not score for a query (outside its
candidate pool) scores 0. Top-k ties break by ``doc_id``. The ``random`` control gives each
(query, document) a seeded uniform score, so it is a method like the others in both experiments.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..engine import Damping
from .settings import ScoreKey

CONTROL = "random"   # seeded random scores: the control method
GOLD = "gold"        # every evaluated query's gold documents
NONE = "none"        # nothing removed: the reference retrain


class CounterfactualConfigError(ValueError):
    """A bad ``[counterfactual]`` value; the message names the key."""


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class CounterfactualArgs:
    """How the counterfactual evaluation retrains (``[counterfactual]`` in msif.toml).
    Saved as JSON with every summary row (column ``args``)."""

    ks: tuple[int, ...] = _help("top-k sizes: each method removes the union over queries of each query's top-k documents", (1, 3, 10))
    gold: bool = _help("also remove every evaluated query's gold documents (needs gold_doc_ids)", True)
    n_subsets: int = _help("LDS: number of random α-subsets of the corpus, each retrained", 24)
    alpha: float = _help("LDS: fraction of the corpus in each subset", 0.5)
    noise_seeds: int = _help("extra training seeds for the noise floor (full corpus and noise_subsets LDS subsets)", 1)
    noise_subsets: int = _help("LDS subsets retrained with each extra seed; -1 = all", -1)
    seed: int = _help("training seed of every run (the extra seeds are seed+1 …)", 0)
    subset_seed: int = _help("seed of the LDS subset draws and the random control's scores", 0)
    bootstrap: int = _help("bootstrap resamples over queries for the confidence intervals", 1000)
    confidence: float = _help("confidence level of the intervals", 0.95)
    max_queries: int = _help("evaluate the first N lake queries (by query_id); 0 = all", 0)
    workers: int = _help("retrains run in parallel (processes, one torch thread each)", 2)
    recipe: str = _help("training recipe 'module:function' (corpus_docs, out_dir, seed, **recipe_options) -> model dir; "
                        "empty = the default world's", "")
    recipe_options: Mapping[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments for the recipe (JSON values)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(self.ks))
        object.__setattr__(self, "recipe_options", dict(self.recipe_options))
        problems = []
        if not self.ks or any(not _is_int(k) or k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            problems.append(f"ks={list(self.ks)}; give distinct integers >= 1, e.g. [1, 3, 10]")
        for name, low in (("n_subsets", 0), ("noise_seeds", 0), ("bootstrap", 0), ("max_queries", 0), ("workers", 1),
                          ("seed", 0), ("subset_seed", 0), ("noise_subsets", -1)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                problems.append(f"{name}={getattr(self, name)!r}; must be an integer >= {low}")
        if not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha < 1.0:
            problems.append(f"alpha={self.alpha!r}; must be in (0, 1), e.g. 0.5")
        if not isinstance(self.confidence, (int, float)) or not 0.5 <= self.confidence < 1.0:
            problems.append(f"confidence={self.confidence!r}; must be in [0.5, 1), e.g. 0.95")
        if self.recipe and (self.recipe.count(":") != 1 or not all(self.recipe.split(":"))):
            problems.append(f"recipe={self.recipe!r}; write 'package.module:function'")
        try:
            json.dumps(self.recipe_options, sort_keys=True)
        except TypeError as err:
            problems.append(f"recipe_options: {err}")
        if problems:
            raise CounterfactualConfigError("; ".join(problems))

    @property
    def n_noise_subsets(self) -> int:
        return self.n_subsets if self.noise_subsets < 0 else min(self.noise_subsets, self.n_subsets)

    def to_config(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_config(), sort_keys=True)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str = "[counterfactual]") -> "CounterfactualArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CounterfactualConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        try:
            return cls(**raw)
        except CounterfactualConfigError as err:
            raise CounterfactualConfigError(f"{where}: {err}") from None
        except TypeError as err:
            raise CounterfactualConfigError(f"{where}: {err}") from None

    @staticmethod
    def help() -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(CounterfactualArgs)}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------ the runs


@dataclass(frozen=True)
class Run:
    """One retrain. ``kind``: baseline (nothing removed), reseed (nothing removed, another
    seed), removal (a method's top-k union, or gold), lds (an α-subset), lds_reseed."""

    key: str                     # the Dagster partition key
    kind: str
    seed: int
    method: str | None = None    # a score method, CONTROL, GOLD or NONE
    damping: Damping | None = None
    k: int | None = None
    subset: str | None = None    # LDS subset id

    @property
    def columns(self) -> dict[str, Any]:
        d = self.damping
        return {"run_key": self.key, "kind": self.kind, "method": self.method,
                "damping_kind": None if d is None else d.mode, "damping": None if d is None else d.value,
                "k": self.k, "subset": self.subset, "seed": self.seed}

    @property
    def label(self) -> str:
        base = self.method if self.damping is None else f"{self.method}@{self.damping.label}"
        return f"{base}" + ("" if self.k is None else f" top-{self.k}")


def method_keys(score_keys: Sequence[ScoreKey]) -> list[tuple[str, Damping | None]]:
    """The methods removals are made for: every score group, then the random control."""
    return [(k.method, k.damping) for k in score_keys] + [(CONTROL, None)]


def _tag(method: str, damping: Damping | None) -> str:
    return method if damping is None else f"{method}-{damping.label.replace(':', '-')}"


def removal_runs(args: CounterfactualArgs, score_keys: Sequence[ScoreKey]) -> list[Run]:
    """Partition keys of the removal retrains: ``none``, ``none-s<seed>``, ``gold``, ``<method>-k<k>``."""
    runs = [Run(NONE, "baseline", args.seed, NONE)]
    runs += [Run(f"{NONE}-s{args.seed + i}", "reseed", args.seed + i, NONE) for i in range(1, args.noise_seeds + 1)]
    if args.gold:
        runs.append(Run(GOLD, "removal", args.seed, GOLD))
    for method, damping in method_keys(score_keys):
        runs += [Run(f"{_tag(method, damping)}-k{k}", "removal", args.seed, method, damping, k) for k in args.ks]
    return runs


def lds_runs(args: CounterfactualArgs) -> list[Run]:
    """Partition keys of the LDS retrains: ``s<j>`` and ``s<j>-seed<seed>``."""
    width = max(2, len(str(max(args.n_subsets - 1, 0))))
    ids = [f"s{j:0{width}d}" for j in range(args.n_subsets)]
    runs = [Run(s, "lds", args.seed, subset=s) for s in ids]
    for i in range(1, args.noise_seeds + 1):
        runs += [Run(f"{s}-seed{args.seed + i}", "lds_reseed", args.seed + i, subset=s) for s in ids[: args.n_noise_subsets]]
    return runs


# ------------------------------------------------------------------ scores → removal sets and subsets


def document_scores(chunk_scores: pa.Table) -> dict[tuple[str, Damping | None], dict[str, dict[str, float]]]:
    """``{(method, damping): {query_id: {doc_id: Σ chunk scores}}}``."""
    keys = ["query_id", "doc_id", "method", "damping_kind", "damping"]
    table = chunk_scores.select([*keys, "score"]).group_by(keys).aggregate([("score", "sum")])
    out: dict[tuple[str, Damping | None], dict[str, dict[str, float]]] = {}
    cols = [table.column(c).to_pylist() for c in (*keys, "score_sum")]
    for qid, doc, method, kind, value, score in zip(*cols):
        key = (method, None if value is None else Damping(kind, float(value)))
        out.setdefault(key, {}).setdefault(qid, {})[doc] = score
    return out


def random_scores(query_ids: Sequence[str], doc_ids: Sequence[str], seed: int) -> dict[str, dict[str, float]]:
    """The control: per query, a seeded uniform score for every document."""
    out = {}
    for qid in query_ids:
        rng = random.Random(f"{seed}:{qid}")
        out[qid] = {d: rng.random() for d in sorted(doc_ids)}
    return out


def top_k(scores: Mapping[str, float], k: int) -> list[tuple[str, float]]:
    """The k largest scores (ties by doc_id)."""
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def removal_rows(runs: Sequence[Run], scores: Mapping[tuple[str, Damping | None], Mapping[str, Mapping[str, float]]],
                 gold: Mapping[str, Sequence[str]], query_ids: Sequence[str]) -> list[dict]:
    """Rows of ``counterfactual_removals``: per removal run, each query's removed documents
    (its top-k with rank and score; or its gold documents). A document chosen by several
    queries appears once per query; the run removes their union."""
    rows = []
    for run in runs:
        if run.kind != "removal":
            continue
        base = {k: v for k, v in run.columns.items() if k in ("run_key", "method", "damping_kind", "damping", "k")}
        for qid in query_ids:
            if run.method == GOLD:
                picked = [(d, None, None) for d in sorted(set(gold.get(qid, ())))]
            else:
                by_query = scores.get((run.method, run.damping))
                if by_query is None:
                    raise ValueError(f"no {run.label.split(' ')[0]} scores in the lake for the current models: materialize influence_scores "
                                     "with this method and damping, or drop it from [compute]")
                picked = [(d, i, s) for i, (d, s) in enumerate(top_k(by_query.get(qid, {}), run.k), 1)]
            rows += [{**base, "query_id": qid, "doc_id": d, "rank": r, "score": s} for d, r, s in picked]
    return rows


def lds_subset_rows(doc_ids: Sequence[str], args: CounterfactualArgs) -> list[dict]:
    """Rows of ``lds_subsets``: subset j holds round(α·D) documents drawn without replacement
    (numpy generator seeded by (subset_seed, j)) from the sorted corpus."""
    docs = sorted(set(doc_ids))
    size = int(round(args.alpha * len(docs)))
    if not 0 < size < len(docs):
        raise ValueError(f"alpha={args.alpha} of {len(docs)} documents leaves an empty or full subset; use a larger corpus")
    rows = []
    for run in lds_runs(args):
        if run.kind != "lds":
            continue
        j = int(run.subset[1:])
        picked = np.random.default_rng([args.subset_seed, j]).choice(len(docs), size=size, replace=False)
        rows += [{"subset": run.subset, "doc_id": docs[i]} for i in sorted(picked)]
    return rows


def training_docs(run: Run, corpus_ids: Sequence[str], removals: pa.Table | None, subsets: pa.Table | None) -> list[str]:
    """The doc ids a run trains on, in corpus order."""
    if run.kind in ("baseline", "reseed"):
        return list(corpus_ids)
    if run.kind == "removal":
        mask = pc.equal(removals.column("run_key"), run.key)
        removed = set(removals.filter(mask).column("doc_id").to_pylist())
        return [d for d in corpus_ids if d not in removed]
    mask = pc.equal(subsets.column("subset"), run.subset)
    keep = set(subsets.filter(mask).column("doc_id").to_pylist())
    if not keep:
        raise ValueError(f"LDS subset {run.subset} has no documents: materialize lds_subsets")
    return [d for d in corpus_ids if d in keep]


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
