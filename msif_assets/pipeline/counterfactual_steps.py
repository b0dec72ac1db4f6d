"""The counterfactual evaluation's steps as plain functions (read the lake, compute, write the
lake); the Dagster assets in ``defs/counterfactual.py`` call them, one line each.

removal sets  ← influence scores + queries + corpus   (eval/counterfactual_removals.parquet)
lds subsets   ← corpus                                 (eval/lds_subsets.parquet)
retrain(run)  ← its training set + the recipe          (counterfactual/models/<key>/, measured on the queries)
removal eval  ← every removal retrain                  (counterfactual_outputs, counterfactual_summary)
lds eval      ← every LDS retrain + influence scores   (lds_outputs, lds_summary, lds_per_query)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..lake import tables
from ..lake.atomic import atomic_write
from ..lake.layout import LakeLayout
from . import counterfactual as cf
from . import counterfactual_stats as st
from . import retrain as rt
from .settings import ComputeSettings, ScoreKey

REMOVAL_ASSET, LDS_ASSET = "cf_removal_models", "lds_models"


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def corpus_docs(layout: LakeLayout) -> list[dict[str, Any]]:
    """Every accepted document of the lake (``doc_id``, ``text``, ``shard``), shards in name order."""
    docs = []
    for shard in tables.list_shards(layout):
        t = tables.read_docs(layout, shard)
        docs += [{"doc_id": d, "text": x, "shard": shard} for d, x in zip(t.column("doc_id").to_pylist(), t.column("text").to_pylist())]
    if not docs:
        raise ValueError("the lake holds no documents: materialize the corpus first")
    return docs


def evaluated_queries(layout: LakeLayout, args: cf.CounterfactualArgs) -> pa.Table:
    """The lake's queries by query_id, the first ``max_queries`` (0 = all)."""
    q = tables.read_queries(layout).sort_by("query_id")
    if q.num_rows == 0:
        raise ValueError("the lake holds no queries: materialize queries first")
    return q.slice(0, args.max_queries) if args.max_queries else q


# ------------------------------------------------------------------ removal sets and subsets


def write_removal_sets(layout: LakeLayout, ft_model: str, pt_model: str, args: cf.CounterfactualArgs,
                       score_keys: Sequence[ScoreKey]) -> pa.Table:
    from .evaluation import load_chunk_scores
    from .models import ModelIds

    queries = evaluated_queries(layout, args)
    qids = queries.column("query_id").to_pylist()
    gold = dict(zip(qids, [g or [] for g in queries.column("gold_doc_ids").to_pylist()]))
    if args.gold and not any(gold.values()):
        raise ValueError("no evaluated query has gold_doc_ids: add them, or set [counterfactual] gold = false")
    scores = cf.document_scores(load_chunk_scores(layout, ModelIds(pt_model, ft_model)))
    scores[(cf.CONTROL, None)] = cf.random_scores(qids, [d["doc_id"] for d in corpus_docs(layout)], args.subset_seed)
    rows = cf.removal_rows(cf.removal_runs(args, score_keys), scores, gold, qids)
    now = now_utc()
    table = pa.Table.from_pylist([{**r, "ft_model": ft_model, "computed_at": now} for r in rows],
                                 schema=tables.COUNTERFACTUAL_REMOVALS.schema)
    tables.write_eval(layout, tables.COUNTERFACTUAL_REMOVALS.name, table)
    return table


def write_lds_subsets(layout: LakeLayout, args: cf.CounterfactualArgs) -> pa.Table:
    rows = cf.lds_subset_rows([d["doc_id"] for d in corpus_docs(layout)], args)
    now = now_utc()
    table = pa.Table.from_pylist([{**r, "alpha": float(args.alpha), "subset_seed": args.subset_seed, "computed_at": now}
                                  for r in rows], schema=tables.LDS_SUBSETS.schema)
    tables.write_eval(layout, tables.LDS_SUBSETS.name, table)
    return table


# ------------------------------------------------------------------ one retrain


def run_docs(layout: LakeLayout, run: cf.Run, docs: Sequence[dict] | None = None) -> list[dict]:
    """The documents ``run`` trains on, in lake order."""
    docs = corpus_docs(layout) if docs is None else docs
    removals = tables.read_eval(layout, tables.COUNTERFACTUAL_REMOVALS.name) if run.kind == "removal" else None
    subsets = tables.read_eval(layout, tables.LDS_SUBSETS.name) if run.kind.startswith("lds") else None
    if removals is not None and not pc.any(pc.equal(removals.column("run_key"), run.key)).as_py():
        raise ValueError(f"no removal set for {run.key}: materialize cf_removal_sets")
    keep = set(cf.training_docs(run, [d["doc_id"] for d in docs], removals, subsets))
    return [d for d in docs if d["doc_id"] in keep]


@dataclass
class RetrainResult:
    record: dict
    outputs: pa.Table
    n_train_docs: int


def retrain_run(layout: LakeLayout, asset: str, run: cf.Run, recipe: rt.Recipe, queries: pa.Table,
                settings: ComputeSettings) -> RetrainResult:
    """Train (or reuse) the run's model, measure it on ``queries``, point the partition at it."""
    docs = run_docs(layout, run)
    record = rt.train_or_reuse(layout, recipe, docs, run.seed, {"partition": run.key, "asset": asset})
    outputs = rt.measure_cached(record, layout, queries, settings)
    rt.write_run_pointer(layout, asset, run.key, {"key": record["key"], "queries": rt.queries_digest(queries),
                                                  "n_train_docs": len(docs), "train_seconds": record["train_seconds"]})
    return RetrainResult(record, outputs, len(docs))


# ------------------------------------------------------------------ collecting the runs


def _collect(layout: LakeLayout, asset: str, runs: Sequence[cf.Run], queries: pa.Table, recipe: rt.Recipe,
             ft_model: str, settings: ComputeSettings) -> tuple[pa.Table, dict[str, float]]:
    """Every run's outputs as one table (schema of counterfactual_outputs); checks that each
    partition holds the model its current training set and the current queries call for."""
    docs, digest = corpus_docs(layout), rt.queries_digest(queries)
    parts, seconds, stale = [], {}, []
    now = now_utc()
    for run in runs:
        pointer = rt.read_run_pointer(layout, asset, run.key)
        expected = rt.training_key(recipe, run.seed, run_docs(layout, run, docs))
        if pointer["key"] != expected or pointer["queries"] != digest:
            stale.append(run.key)
            continue
        record = rt.read_record(layout, pointer["key"])
        out = rt.measure_cached({**record, "model_dir": str(rt.cache_dir(layout, record["key"]) / record["model_subdir"])},
                                layout, queries, settings)
        seconds[run.key] = record["train_seconds"]
        cols = {**run.columns, "n_train_docs": pointer["n_train_docs"], "model_key": record["key"], "ft_model": ft_model,
                "computed_at": now}
        parts.append([{**row, **cols} for row in out.to_pylist()])
    if stale:
        raise ValueError(f"{asset} partitions {stale[:8]}{' …' if len(stale) > 8 else ''} hold a model of an older training "
                         "set or query set: materialize them again (msif validate does)")
    rows = [r for part in parts for r in part]
    return pa.Table.from_pylist(rows, schema=tables.COUNTERFACTUAL_OUTPUTS.schema), seconds


def _by_run(outputs: pa.Table) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in outputs.to_pylist():
        out.setdefault(r["run_key"], {})[r["query_id"]] = r
    return out


def removal_eval(layout: LakeLayout, args: cf.CounterfactualArgs, score_keys: Sequence[ScoreKey], recipe: rt.Recipe,
                 ft_model: str, settings: ComputeSettings) -> tuple[pa.Table, pa.Table]:
    """Write counterfactual_outputs and counterfactual_summary; return both."""
    runs = cf.removal_runs(args, score_keys)
    queries = evaluated_queries(layout, args)
    outputs, seconds = _collect(layout, REMOVAL_ASSET, runs, queries, recipe, ft_model, settings)
    removals = tables.read_eval(layout, tables.COUNTERFACTUAL_REMOVALS.name)
    union = removals.group_by("run_key").aggregate([("doc_id", "count_distinct")])
    n_removed = dict(zip(union.column("run_key").to_pylist(), union.column("doc_id_count_distinct").to_pylist()))
    rows = st.removal_summary(_by_run(outputs), runs, n_removed, seconds, args.bootstrap, args.confidence, args.subset_seed)
    now = now_utc()
    summary = pa.Table.from_pylist([{**r, "args": args.to_json(), "ft_model": ft_model, "computed_at": now} for r in rows],
                                   schema=tables.COUNTERFACTUAL_SUMMARY.schema)
    tables.write_eval(layout, tables.COUNTERFACTUAL_OUTPUTS.name, outputs)
    tables.write_eval(layout, tables.COUNTERFACTUAL_SUMMARY.name, summary)
    return outputs, summary


def lds_eval(layout: LakeLayout, args: cf.CounterfactualArgs, score_keys: Sequence[ScoreKey], recipe: rt.Recipe,
             ft_model: str, pt_model: str, settings: ComputeSettings) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Write lds_outputs, lds_summary and lds_per_query; return them."""
    from .evaluation import load_chunk_scores
    from .models import ModelIds

    runs = cf.lds_runs(args)
    queries = evaluated_queries(layout, args)
    qids = queries.column("query_id").to_pylist()
    outputs, _ = _collect(layout, LDS_ASSET, runs, queries, recipe, ft_model, settings)
    outputs = outputs.cast(tables.LDS_OUTPUTS.schema)
    by_run = _by_run(outputs)
    docs = [d["doc_id"] for d in corpus_docs(layout)]
    subsets = tables.read_eval(layout, tables.LDS_SUBSETS.name)
    main = [r for r in runs if r.kind == "lds"]
    col = {d: i for i, d in enumerate(docs)}
    members = np.zeros((len(main), len(docs)))
    for i, run in enumerate(main):
        keep = subsets.filter(pc.equal(subsets.column("subset"), run.subset)).column("doc_id").to_pylist()
        members[i, [col[d] for d in keep if d in col]] = 1.0
    measured = np.array([[by_run[r.key][q]["logp"] for q in qids] for r in main])
    scores = cf.document_scores(load_chunk_scores(layout, ModelIds(pt_model, ft_model)))
    scores = {key: scores[key] for key in ((k.method, k.damping) for k in score_keys) if key in scores}
    scores[(cf.CONTROL, None)] = cf.random_scores(qids, docs, args.subset_seed)
    boot = (args.bootstrap, args.confidence, args.subset_seed)
    summary, per_query = st.lds_rows(measured, members, scores, qids, docs, *boot)
    pairs = {}
    for extra in sorted({r.seed for r in runs if r.kind == "lds_reseed"}):
        noisy = [r for r in runs if r.kind == "lds_reseed" and r.seed == extra]
        index = {r.subset: i for i, r in enumerate(main)}
        pairs[extra] = (measured[[index[r.subset] for r in noisy]],
                        np.array([[by_run[r.key][q]["logp"] for q in qids] for r in noisy]))
    noise_summary, noise_per_query = st.reseed_rows(pairs, qids, *boot)
    now = now_utc()
    extra_cols = {"ft_model": ft_model, "computed_at": now}
    summary_table = pa.Table.from_pylist(
        [{"seed": None, **r, "alpha": float(args.alpha), "args": args.to_json(), **extra_cols} for r in summary + noise_summary],
        schema=tables.LDS_SUMMARY.schema)
    per_query_table = pa.Table.from_pylist([{"seed": None, **r, **extra_cols} for r in per_query + noise_per_query],
                                           schema=tables.LDS_PER_QUERY.schema)
    tables.write_eval(layout, tables.LDS_OUTPUTS.name, outputs)
    tables.write_eval(layout, tables.LDS_SUMMARY.name, summary_table)
    tables.write_eval(layout, tables.LDS_PER_QUERY.name, per_query_table)
    return outputs, summary_table, per_query_table


def baseline_drift(layout: LakeLayout, args: cf.CounterfactualArgs, outputs: pa.Table, model_dir: Path,
                   settings: ComputeSettings) -> float:
    """max over queries of |log p under the ``none`` retrain − under the lake's fine-tuned model|:
    0 when the recipe reproduces the lake's models (same documents, seed and schedule)."""
    original = rt.measure(model_dir, evaluated_queries(layout, args), settings)
    base = {r["query_id"]: r["logp"] for r in outputs.to_pylist() if r["kind"] == "baseline"}
    return max(abs(base[q] - lp) for q, lp in zip(original.column("query_id").to_pylist(), original.column("logp").to_pylist()))


def plot(rows: Sequence[dict], path: Path, kind: str) -> Path:
    """Write the removal (``kind='removal'``) or LDS plot as PNG, atomically."""
    draw = st.plot_removals if kind == "removal" else st.plot_lds
    return atomic_write(path, lambda tmp: draw(rows, tmp))
