"""``msif demo`` / ``msif materialize`` / ``msif refresh``: run the lineage in-process.

Runs are recorded in a Dagster instance that belongs to the lake (its run history says
what the lake holds): ``$DAGSTER_HOME`` when set; else the repository's ``dagster_home/``
for the default lake ``./lake`` (``make ui`` serves it); else ``<lake>/.dagster``, or for a lake
on an object store ``~/.msif/instances/<hash of its URI>`` (set ``$DAGSTER_HOME`` to share one
instance, e.g. on PostgreSQL: ``deploy/postgres/``).
"""

import dataclasses
import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path

from ..lake.layout import LakeLayout
from ..lake.storage import is_remote, lake_path, require_bucket
from .options import lake_option

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_HOME = REPO_ROOT / "dagster_home"


def _instance(lake_root: str):
    import shutil

    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        lake = lake_path(lake_root)
        if is_remote(lake):
            home = Path.home() / ".msif" / "instances" / hashlib.sha256(str(lake).encode()).hexdigest()[:16]
        else:
            home = REPO_HOME if lake == REPO_ROOT / "lake" else lake / ".dagster"
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists() and (REPO_HOME / "dagster.yaml").is_file():
            shutil.copy(REPO_HOME / "dagster.yaml", home / "dagster.yaml")
        os.environ["DAGSTER_HOME"] = str(home)
    # Two processes creating a new instance's SQLite tables at once both stamp their schema
    # version, and the instance is unreadable after: creation is serialized.
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".msif-init.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            instance = dg.DagsterInstance.get()
            instance.get_runs(limit=1)  # the run and event-log storages exist and are migrated
            return instance
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _setup(args):
    from ..config import load_config
    from ..defs.build import build_definitions

    # Our progress at INFO; libraries (dagster, alembic, httpx, lancedb, ...) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("msif_assets").setLevel(logging.INFO)
    for noisy in ("dagster", "dagster.automation_condition_tester", "bm25s"):  # these set their own levels
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; our log lines report progress
    config = load_config(args.config)
    if args.lake:
        config = dataclasses.replace(config, lake_root=str(lake_path(args.lake)))
    args.lake = config.lake_root  # where this command's logs go
    require_bucket(lake_path(config.lake_root))
    return config, build_definitions(config), _instance(config.lake_root)


def bring_up_to_date(config, defs, instance, wait: bool = True) -> tuple:
    """:func:`_bring_up_to_date` under the lake's lock, after failing runs a killed process left."""
    from .lake_lock import fail_orphaned_runs, lake_lock

    with lake_lock(config.lake_root, wait=wait):
        fail_orphaned_runs(instance)
        return _bring_up_to_date(config, defs, instance)


def _bring_up_to_date(config, defs, instance) -> tuple:
    """Bring the lake up to date with its inputs, so that any mix of changes converges.

    A new lake is materialized in full. Otherwise: (1) the automation conditions refresh what
    changed in the inputs (models, queries, settings, shard files) over the known shards, in
    dependency order; (2) new inbox files become shard partitions, which then only meet
    up-to-date factors and query gradients; (3) partitions still missing (a shard whose run
    failed before) are materialized and what they feed refreshed. The cursor is saved only
    after success, so the next run sees a failed run's changes again."""
    import dagster as dg

    from . import runner

    started = time.perf_counter()
    inbox = config.resolved_inputs()["inbox"]
    if config.is_demo:
        runner.execute(defs, instance, {dg.AssetKey("default_world"): {None}})
    runner.observe_inputs(defs, instance)
    cursor_path = LakeLayout(config.lake_root).root / ".automation_cursor"
    cursor = runner.load_cursor(cursor_path)
    # a new or emptied lake holds nothing, whatever an older run history says
    lake_empty = not LakeLayout(config.lake_root).shards_dir.is_dir()
    refreshed = runner.RunLog()
    if not lake_empty and cursor is not None:
        refreshed, cursor = runner.refresh(defs, instance, cursor)
    new_shards = runner.register_shards(instance, inbox)
    if new_shards and cursor is not None:
        _, cursor = runner.refresh(defs, instance, cursor, run_log=refreshed)
    everything = runner.all_requests(defs, instance)
    everything.pop(dg.AssetKey("default_world"), None)  # built or reused above: once per run
    missing = everything if lake_empty else {k: v for k, v in everything.items() if not _materialized(instance, k, v)}
    ran = runner.execute(defs, instance, missing) if missing else runner.RunLog()
    runner.retry_deferred(defs, instance, ran)
    if cursor is None:  # the first tick only settles the cursor
        _, cursor = runner.automation_tick(defs, instance, None)
    elif missing and not lake_empty:
        _, cursor = runner.refresh(defs, instance, cursor, run_log=refreshed)
    runner.save_cursor(cursor_path, cursor)
    return ran, refreshed, new_shards, time.perf_counter() - started


def _materialized(instance, key, partitions) -> bool:
    if partitions == {None}:
        return instance.get_latest_materialization_event(key) is not None
    done = instance.get_materialized_partitions(key)
    return set(partitions) <= set(done)


def cmd_demo(args) -> int:
    config, defs, instance = _setup(args)
    if not config.is_demo:
        print(f"msif demo runs the embedded default world, but {config.source} brings inputs; use `msif materialize`.")
        return 2
    ran, refreshed, _, seconds = bring_up_to_date(config, defs, instance, wait=not args.no_wait)
    from .report import print_demo_report

    print_demo_report(config, ran, refreshed, seconds)
    return 0


def cmd_materialize(args) -> int:
    config, defs, instance = _setup(args)
    ran, refreshed, new_shards, seconds = bring_up_to_date(config, defs, instance, wait=not args.no_wait)
    print(f"{len(ran.executed) + len(refreshed.executed)} asset partitions in {ran.runs + refreshed.runs} runs, {seconds:.1f}s "
          f"(new shards: {', '.join(new_shards) or 'none'}); lake at {config.lake_root}")
    return 0


def register(subparsers) -> None:
    for name, handler, text in (
        ("demo", cmd_demo, "build the default world and run the whole lineage on it, then show results"),
        ("materialize", cmd_materialize, "materialize everything missing, then refresh whatever changed (your config)"),
        ("refresh", cmd_materialize, "alias of materialize: bring the lake up to date with its inputs"),
    ):
        parser = subparsers.add_parser(name, parents=[lake_option()], help=text, description=text)
        parser.add_argument("--config", default=None, help="msif.toml (default: $MSIF_CONFIG or ./msif.toml; none = default world)")
        parser.add_argument("--no-wait", action="store_true", help="stop at once if another msif process is materializing this lake")
        parser.set_defaults(handler=handler)
