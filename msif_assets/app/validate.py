"""``msif validate``: the counterfactual proof on the lake's world, in one command.

Brings the lake up to date (as ``msif materialize``), then materializes the counterfactual
assets (``defs/counterfactual.py``): the removal sets and LDS subsets, every retrain partition
that is missing or stale — ``workers`` at a time, one Dagster run per partition, in separate
processes — and the two evaluations; prints ``eval_counterfactual`` and ``eval_lds``. A
partition whose training set, seed and recipe are unchanged is not run again (and a re-run
reuses the cached model), so a second ``msif validate`` only re-evaluates.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from .options import lake_option

log = logging.getLogger(__name__)
MODEL_ASSETS = ("cf_removal_models", "lds_models")
SETS, EVALS = ("cf_removal_sets", "lds_subsets"), ("counterfactual_eval", "lds_eval")
TABLE_SQL = {
    "eval_counterfactual": "SELECT label, k, n_removed, round(mean_delta_logp, 3) AS delta_logp, round(delta_ci_lo, 3) AS ci_lo, "
                           "round(delta_ci_hi, 3) AS ci_hi, round(mean_abs_delta_logp, 3) AS abs_delta, round(flip_rate, 3) AS flips, "
                           "round(flip_ci_lo, 3) AS flip_lo, round(flip_ci_hi, 3) AS flip_hi, round(accuracy, 3) AS acc, "
                           "round(train_seconds) AS train_s FROM eval_counterfactual",
    "eval_lds": "SELECT label, round(lds, 3) AS lds, round(ci_lo, 3) AS ci_lo, round(ci_hi, 3) AS ci_hi, "
                "round(ci_lo_subsets, 3) AS subsets_lo, round(ci_hi_subsets, 3) AS subsets_hi, n_queries, n_subsets FROM eval_lds",
}


@dataclass
class ValidateReport:
    """What ``run_counterfactual`` did: partitions run and skipped (``(asset, partition)``),
    whether the evaluations ran (not when ``limit`` stopped early), and wall time."""

    ran: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    evaluated: bool = False
    seconds: float = 0.0
    retrain_seconds: float = 0.0  # every partition's training time, whether trained now or earlier (cache)


def retrain_seconds(lake_root, partitions: dict[str, list[str]]) -> float:
    from ..lake.layout import LakeLayout
    from ..pipeline.retrain import read_run_pointer

    layout = LakeLayout(lake_root)
    return float(sum(read_run_pointer(layout, a, p)["train_seconds"] for a, parts in partitions.items() for p in parts))


def stale_partitions(defs, instance, keys) -> dict[str, list[str]]:
    """Per asset, the partitions Dagster reports MISSING or STALE (code or upstream data changed)."""
    import dagster as dg
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    out = {}
    for name in keys:
        key = dg.AssetKey(name)
        parts = graph.get(key).partitions_def.get_partition_keys()
        out[name] = [p for p in parts if resolver.get_status(key, p) != StaleStatus.FRESH]
    return out


def _execute(defs, instance, names) -> None:
    import dagster as dg

    from . import runner

    runner.execute(defs, instance, {dg.AssetKey(n): {None} for n in names})


_WORKER: dict[str, Any] = {}


def _worker_init(config, cf_args) -> None:
    import torch

    from transformers.utils import logging as hf_logging

    from ..defs.build import build_definitions

    warnings.filterwarnings("ignore", message=r".*is currently in beta")  # as `msif` itself does
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("msif_assets").setLevel(logging.INFO)
    for noisy in ("dagster", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # the recipe trains on its own thread count; measurement stays on one core
    _WORKER["defs"] = build_definitions(config, counterfactual=cf_args)


def _materialize(asset: str, partition: str, defs=None, instance=None) -> tuple[str, str, str | None]:
    """One partition in one Dagster run; returns (asset, partition, error or None)."""
    import dagster as dg

    from . import runner

    defs = defs or _WORKER["defs"]
    instance = instance or dg.DagsterInstance.get()
    assets = list(defs.assets or []) + list(defs.asset_checks or [])
    try:
        runner._run(assets, defs, instance, [dg.AssetKey(asset)], partition, runner.RunLog())
    except RuntimeError as err:
        return asset, partition, str(err)
    return asset, partition, None


def run_counterfactual(config, cf_args, instance, workers: int | None = None, limit: int | None = None) -> ValidateReport:
    """Materialize the counterfactual assets on an up-to-date lake (call under the lake's lock).
    ``workers`` > 1 runs partitions in that many processes (they need a persistent instance,
    ``$DAGSTER_HOME``); ``limit`` stops after that many partitions, before the evaluations."""
    import dagster as dg

    from ..defs.build import build_definitions

    started = time.perf_counter()
    report = ValidateReport()
    defs = build_definitions(config, counterfactual=cf_args)
    _execute(defs, instance, SETS)
    todo = stale_partitions(defs, instance, MODEL_ASSETS)
    graph = defs.resolve_asset_graph()
    every = {a: graph.get(dg.AssetKey(a)).partitions_def.get_partition_keys() for a in MODEL_ASSETS}
    pending = [(a, p) for a in MODEL_ASSETS for p in todo[a]]
    report.skipped = [(a, p) for a in MODEL_ASSETS for p in every[a] if p not in todo[a]]
    if limit is not None:
        pending = pending[:limit]
    workers = workers or cf_args.workers
    log.info("counterfactual: %d partitions to run, %d up to date, %d worker(s)", len(pending), len(report.skipped), workers)
    errors = []
    if workers <= 1 or len(pending) <= 1:
        for asset, partition in pending:
            _, _, error = _materialize(asset, partition, defs, instance)
            (errors.append(error) if error else report.ran.append((asset, partition)))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                 initargs=(config, cf_args)) as pool:
            futures = [pool.submit(_materialize, a, p) for a, p in pending]
            for future in as_completed(futures):
                asset, partition, error = future.result()
                (errors.append(error) if error else report.ran.append((asset, partition)))
                log.info("counterfactual: %s[%s] %s (%d/%d)", asset, partition, "failed" if error else "done",
                         len(report.ran) + len(errors), len(pending))
    if errors:
        raise RuntimeError(f"{len(errors)} retrain partition(s) failed; first: {errors[0]}")
    if limit is None or len(pending) == sum(len(v) for v in todo.values()):
        _execute(defs, instance, EVALS)
        report.evaluated = True
        report.retrain_seconds = retrain_seconds(config.lake_root, every)
    report.seconds = time.perf_counter() - started
    return report


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: write KEY=VALUE, e.g. --set ks=[1,3] or --set n_subsets=8")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def cmd_validate(args) -> int:
    from ..defs.counterfactual import counterfactual_args
    from ..lake.catalog import Catalog
    from ..lake.storage import lake_path, require_local
    from . import lineage
    from .lake_lock import fail_orphaned_runs, lake_lock
    from .render import render

    started = time.perf_counter()
    config, defs, instance = lineage._setup(args)
    # retrained models are saved and loaded as local directories (pipeline/retrain.py)
    require_local(lake_path(config.lake_root), "msif validate (the counterfactual retrains)")
    cf_args = counterfactual_args(config, _overrides(args.set))
    with lake_lock(config.lake_root, wait=not args.no_wait):
        fail_orphaned_runs(instance)
        lineage._bring_up_to_date(config, defs, instance)
        report = run_counterfactual(config, cf_args, instance, args.workers, args.limit)
    seconds = time.perf_counter() - started
    print(f"msif validate: {len(report.ran)} retrain partitions run now, {len(report.skipped)} up to date; "
          f"{seconds:.0f} s wall (counterfactual part {report.seconds:.0f} s); lake at {config.lake_root}")
    if not report.evaluated:
        print("stopped at --limit before the evaluations; run msif validate again to continue")
        return 0
    with Catalog.open(config.lake_root) as catalog:
        for name, sql in TABLE_SQL.items():
            print(f"\n== {name} ==")
            print(render(catalog.query(sql), args.format, args.max_width))
    print(f"\nretraining: {len(report.ran) + len(report.skipped)} runs, {report.retrain_seconds:.0f} s of training in all "
          "(sum over runs, whenever each was trained)")
    print(f"arguments: {cf_args.to_json()}")
    print("per-query rows: counterfactual_deltas, lds_per_query; plots: eval/counterfactual.png, eval/lds.png")
    return 0


def register(subparsers) -> None:
    from .render import output_options

    text = "counterfactual proof: retrain without each method's top-k documents, and on random subsets (LDS)"
    p = subparsers.add_parser("validate", parents=[lake_option()], help=text, description=text + "; prints eval_counterfactual and eval_lds")
    p.add_argument("--config", default=None, help="msif.toml (default: $MSIF_CONFIG or ./msif.toml; none = default world)")
    p.add_argument("--workers", type=int, default=None, help="retrains in parallel (default: [counterfactual] workers)")
    p.add_argument("--limit", type=int, default=None, help="run at most this many retrain partitions, then stop (resume later)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [counterfactual] value, e.g. --set ks=[1,3] --set n_subsets=8 (JSON values)")
    p.add_argument("--no-wait", action="store_true", help="stop at once if another msif process holds the lake")
    output_options(p)
    p.set_defaults(handler=cmd_validate)
