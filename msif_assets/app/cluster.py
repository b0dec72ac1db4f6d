"""``msif materialize --executor celery`` and ``msif worker``: the lineage's steps on Celery workers.

The runner (runner.py) stays what decides *what* runs and in which order — observe the inputs,
add shard partitions, materialize what is missing, refresh what changed — and only *how* a run
executes changes: each run is ``execute_job`` of the Definitions' asset job under the Celery
executor (defs/executors.py), so every step is a task on a worker, light steps on the queue
``dagster`` and heavy ones on ``gpu``; and the per-shard runs of one dependency level run
side by side, so different shards' steps land on different workers.

The job is rebuilt on the workers from the run's own config (:func:`cluster_definitions`, named
by the job's code pointer together with that config): a worker needs the code, the lake and
input paths and the run's Dagster instance, but no ``msif.toml`` or ``$MSIF_CONFIG`` of its own,
and cannot build a different lineage than the runner's. Each worker process builds it once per
config.

Start workers (each with the code installed, the lake and inputs at the same paths, and the
instance reachable: ``$DAGSTER_HOME`` with SQLite in a shared directory on one machine,
PostgreSQL storage across machines), then materialize::

    MSIF_CELERY_BROKER=redis://host:6379/0 msif worker --name gpu1 --queue dagster --queue gpu
    MSIF_CELERY_BROKER=redis://host:6379/0 msif materialize --executor celery

The instance's ``msif_heavy`` pool limit (``concurrency: pools:`` in ``dagster.yaml``; the
repository's says 1) bounds the heavy steps running at once across all workers: set it to the
number of GPU workers, or they take heavy steps one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)
# defs/executors.py's names, spelled here so that `msif --help` imports neither dagster nor torch
DEFAULT_QUEUE, GPU_QUEUE, EXECUTOR_ENV = "dagster", "gpu", "MSIF_EXECUTOR"
DEFAULT_MAX_RUNS = 8  # per-shard runs in flight at once (each a process waiting on its steps' tasks)
POLL_SECONDS = 0.1  # how often a run on the cluster checks its steps' tasks (dagster-celery: 1 s)
WORKER_TAG = "Celery worker"  # dagster-celery's engine-event metadata: the worker that ran a step


# -- the job, rebuilt from its config on every worker ------------------------------------------
def config_to_json(config) -> str:
    """An :class:`~msif_assets.config.MsifConfig` as JSON that :func:`config_from_json` reads back equal."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "compute":
            value = value.to_config()
        elif f.name == "columns":
            value = dataclasses.asdict(value)
        out[f.name] = value
    return json.dumps(out, sort_keys=True)


def config_from_json(text: str):
    from ..config import MsifConfig
    from ..lake.inputs import CorpusColumns

    raw = json.loads(text)
    raw["columns"] = CorpusColumns(**raw["columns"])
    return MsifConfig(**raw)


_DEFINITIONS: dict[tuple[str, str], object] = {}
_DEFINITIONS_LOCK = threading.Lock()


def cluster_definitions(config_json: str, celery_json: str):
    """The Definitions for this config, with the Celery executor; cached per process (a worker
    builds the lineage once, not once per step)."""
    from ..defs.build import build_definitions
    from ..defs.executors import CelerySettings

    with _DEFINITIONS_LOCK:
        key = (config_json, celery_json)
        if key not in _DEFINITIONS:
            settings = CelerySettings(**json.loads(celery_json))
            _DEFINITIONS[key] = build_definitions(config_from_json(config_json), executor=settings.executor())
        return _DEFINITIONS[key]


def reconstructable_job(config, settings):
    """The Definitions' asset job (``__ASSET_JOB``), reconstructed on a worker by calling
    :func:`cluster_definitions` with this config and these settings."""
    from dagster._core.code_pointer import CustomPointer, ModuleCodePointer
    from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    args = [config_to_json(config), json.dumps(settings.to_dict(), sort_keys=True)]
    pointer = CustomPointer(ModuleCodePointer(__name__, cluster_definitions.__name__, None), args, [])  # msif is installed
    return ReconstructableRepository(pointer).get_reconstructable_job(IMPLICIT_ASSET_JOB_NAME)


# -- the runner's runs on the cluster --------------------------------------------------------
def execute(defs, instance, requests, run_log=None, *, job, max_runs: int = DEFAULT_MAX_RUNS):
    """:func:`runner.execute` on the cluster: the same dependency order (everything ready and
    unpartitioned in one run; then every partitioned asset ready together, one run per shard),
    with a level's per-shard runs in flight together, at most ``max_runs`` at a time."""
    from . import runner

    run_log = run_log or runner.RunLog()
    started = time.perf_counter()
    for runs in runner.levels(defs.resolve_asset_graph(), requests):
        results = _run_all(job, instance, runs, max_runs)
        failure = None
        for (keys, partition), result in zip(runs, results):
            try:
                _record(run_log, keys, partition, result)
            except RuntimeError as exc:  # every run's outcome is recorded before the first failure is raised
                failure = failure or exc
        if failure is not None:
            raise failure
    run_log.seconds += time.perf_counter() - started
    return run_log


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What a run on the cluster did (the parts of its result the runner reads)."""

    run_id: str
    success: bool
    materialized: frozenset  # asset keys (user strings)
    errors: tuple  # (exception class, message) per failed step


def _run_all(job, instance, runs, max_runs: int) -> list[RunOutcome]:
    """Execute ``runs`` (``(keys, partition)`` pairs), at most ``max_runs`` at a time, and return
    their outcomes in order.

    Each run is orchestrated by a child process forked from this one (so it starts at once, with
    everything imported): Dagster's run setup reconfigures the process's logging and is not safe
    in threads. A child waits on its steps' Celery tasks and ends with its parent. Ctrl-C (SIGINT)
    reaches the children as it reaches any Dagster run: queued steps are revoked, running ones
    finish; SIGTERM to this process is passed on as SIGINT."""
    import multiprocessing
    import signal
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("fork")
    ref, tags = instance.get_ref(), {"msif/pid": str(os.getpid())}
    outcomes: list = [None] * len(runs)
    pending = list(enumerate(runs))
    active: dict = {}  # connection -> (index, process)
    try:
        while pending or active:
            while pending and len(active) < max(1, max_runs):
                index, (keys, partition) = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_run_child, args=(send, job, ref, keys, partition, tags, os.getpid()),
                                          name=f"msif-run-{partition or 'all'}", daemon=False)
                process.start()
                send.close()
                active[receive] = (index, process)
            for conn in wait(list(active)):
                index, process = active.pop(conn)
                try:
                    outcomes[index] = conn.recv()
                except EOFError:  # the child died without a word (killed)
                    outcomes[index] = RuntimeError(f"the process orchestrating {runs[index][1] or 'the run'} died "
                                                   f"(exit code {process.exitcode}); the next msif run marks its run failed")
                process.join()
                conn.close()
    except KeyboardInterrupt:
        log.warning("stopping: %d run(s) on the cluster revoke their queued steps and wait for their running ones "
                    "(Ctrl-C again to leave at once)", len(active))
        for _, process in active.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for _, process in active.values():
            process.join()
        raise
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def _run_child(conn, job, instance_ref, keys, partition, tags, parent_pid) -> None:
    import warnings

    import dagster as dg
    from celery.exceptions import DuplicateTaskNameWarning
    from dagster_celery import core_execution_loop

    _end_with_parent(parent_pid)
    # dagster-celery registers its step task again for every step it submits: harmless, and noisy
    warnings.filterwarnings("ignore", category=DuplicateTaskNameWarning)
    # its run loop looks at its tasks once a second, a second lost after every step of a chain
    # (corpus_shards → doc_chunks → …); the check is one Redis GET per running step
    core_execution_loop.TICK_SECONDS = POLL_SECONDS
    try:
        with dg.DagsterInstance.from_ref(instance_ref) as instance:
            result = _run(job, instance, keys, partition, tags)
        from .runner import _root_error

        conn.send(RunOutcome(
            run_id=result.run_id, success=result.success,
            materialized=frozenset(e.asset_key.to_user_string() for e in result.get_asset_materialization_events()),
            errors=tuple(_root_error(e.step_failure_data.error) for e in result.get_step_failure_events()),
        ))
    except KeyboardInterrupt:
        conn.send(KeyboardInterrupt())
    except Exception as exc:  # noqa: BLE001 — handed to the parent, which raises it
        conn.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _end_with_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (killed): a run left behind is failed by the next msif run,
    as a killed in-process run is; an orphan must not go on writing the lake."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="msif-parent-watch", daemon=True).start()


def _run(job, instance, keys, partition, tags):
    import dagster as dg

    from .runner import _quiet_console

    label = ", ".join(k.to_user_string() for k in keys)
    log.info("materializing %s%s on the cluster", label, f" [{partition}]" if partition else "")
    tags = {"msif/runner": "cli", "msif/executor": "celery", **tags}
    if partition is not None:
        tags["dagster/partition"] = partition
    return dg.execute_job(job, instance, run_config=_quiet_console(), tags=tags, asset_selection=list(keys), raise_on_error=False)


def _record(run_log, keys, partition, outcome: RunOutcome) -> None:
    """What runner._run does with a run's result (runner.record_run)."""
    from . import runner

    done = {k for k in keys if k.to_user_string() in outcome.materialized}
    errors = [] if outcome.success else (list(outcome.errors) or [("RunFailure", "see the run's event log")])
    runner.record_run(run_log, keys, partition, outcome.run_id, done, errors)


_PATCH_LOCK = threading.Lock()


@contextmanager
def _runner_on_cluster(job, max_runs: int) -> Iterator[None]:
    """Route the runner's executions (``runner.execute``, which ``refresh``, ``retry_deferred``
    and ``lineage`` call by name) to :func:`execute` for the duration of one materialization."""
    from . import runner

    with _PATCH_LOCK:
        original = runner.execute
        runner.execute = lambda defs, instance, requests, run_log=None: execute(
            defs, instance, requests, run_log, job=job, max_runs=max_runs)
        try:
            yield
        finally:
            runner.execute = original


def bring_up_to_date(config, instance, settings, wait: bool = True, max_runs: int = DEFAULT_MAX_RUNS):
    """``lineage.bring_up_to_date`` with every run executed on the Celery workers."""
    from . import lineage

    job = reconstructable_job(config, settings)
    defs = cluster_definitions(*job.repository.pointer.reconstructable_args)  # what the workers build
    with _runner_on_cluster(job, max_runs):
        return lineage.bring_up_to_date(config, defs, instance, wait=wait)


def steps_by_worker(instance, run_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Which worker ran which step: ``{worker hostname: [(run id, step key), …]}``, from the
    engine event each worker records when it starts a step."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for run_id in run_ids:
        for record in instance.all_logs(run_id):
            event = record.dagster_event
            data = getattr(event, "event_specific_data", None) if event is not None else None
            metadata = getattr(data, "metadata", None) or {}
            if event is not None and event.event_type_value == "ENGINE_EVENT" and WORKER_TAG in metadata:
                out[metadata[WORKER_TAG].value].append((run_id, event.step_key))
    return dict(out)


# -- workers ---------------------------------------------------------------------------------
def worker_config_dir(settings) -> Path:
    """A directory holding ``dagster_celery_config.py`` (what ``dagster_celery.app`` reads at
    start) for these settings; one per settings, reused."""
    body = "".join(f"{k} = {v!r}\n" for k, v in {"broker_url": settings.broker, "result_backend": settings.result_backend,
                                                    **settings.app_config()}.items())
    folder = Path(tempfile.gettempdir()) / f"msif-celery-{os.getuid()}-{hashlib.sha256(body.encode()).hexdigest()[:16]}"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "dagster_celery_config.py"
    if not path.exists() or path.read_text() != body:
        tmp = folder / f".{os.getpid()}.tmp"
        tmp.write_text(body)
        tmp.replace(path)
    return folder


def worker_command(settings, queues: Sequence[str] = (DEFAULT_QUEUE, GPU_QUEUE), name: str | None = None,
                   concurrency: int = 1, loglevel: str = "INFO", environ=None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a Celery worker for msif's steps (``celery -A
    dagster_celery.app worker``, as ``dagster-celery worker start`` runs it)."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join([str(worker_config_dir(settings)), *filter(None, [env.get("PYTHONPATH")])])
    argv = [sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker", "--loglevel", loglevel,
            "-Q", ",".join(queues), "--concurrency", str(concurrency), "--prefetch-multiplier=1", "-E",
            # msif (torch, transformers, the definitions' modules) is imported once, before the pool's
            # processes fork: a worker's first step does not pay for it
            "--include", "msif_assets.defs.build"]
    if name:
        argv += ["-n", name if "@" in name else f"{name}@%h"]
    return argv, env


# -- command line ----------------------------------------------------------------------------
def check_workers(settings, queues: Sequence[str] = (DEFAULT_QUEUE, GPU_QUEUE), timeout: float = 2.0) -> dict[str, list[str]]:
    """The workers that answer on the broker, with their queues; a :class:`ConfigError` when no
    worker takes one of ``queues`` (a run would wait for it forever)."""
    from celery import Celery

    from ..config import ConfigError

    app = Celery("msif-check", broker=settings.broker, backend=settings.result_backend)
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:  # noqa: BLE001 — the broker is unreachable
        raise ConfigError(f"cannot reach the Celery broker {settings.broker}: {exc}") from None
    finally:
        app.close()
    workers = {name: sorted(q["name"] for q in found) for name, found in replies.items()}
    missing = [q for q in queues if not any(q in taken for taken in workers.values())]
    if missing:
        raise ConfigError(f"no Celery worker on {settings.broker} takes the queue(s) {missing} (workers: {workers or 'none'}); "
                          f"start one with `msif worker --queue {' --queue '.join(missing)}`")
    return workers


def cmd_materialize(args: argparse.Namespace) -> int:
    from ..defs.executors import celery_settings
    from . import lineage

    settings = celery_settings(broker=args.broker)
    workers = check_workers(settings)  # before anything runs: without them, runs would wait forever
    config, _, instance = lineage._setup(args)
    log.info("celery workers: %s", ", ".join(f"{w} ({'/'.join(q)})" for w, q in sorted(workers.items())))
    ran, refreshed, new_shards, seconds = bring_up_to_date(config, instance, settings, wait=not args.no_wait, max_runs=args.max_runs)
    print(f"{len(ran.executed) + len(refreshed.executed)} asset partitions in {ran.runs + refreshed.runs} runs on the celery "
          f"workers, {seconds:.1f}s (new shards: {', '.join(new_shards) or 'none'}); lake at {config.lake_root}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ..defs.executors import celery_settings

    settings = celery_settings(broker=args.broker)
    argv, env = worker_command(settings, args.queue or [DEFAULT_QUEUE, GPU_QUEUE], args.name, args.concurrency, args.loglevel)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)  # the worker replaces this process: signals reach celery directly
    return 0  # not reached


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=["default", "celery"], default=None,
                        help=f"where steps run: in this process (default), or on Celery workers (celery; needs a broker). "
                             f"Default: ${EXECUTOR_ENV}, else default")
    parser.add_argument("--broker", default=None, help="Celery broker URL, e.g. redis://host:6379/0 (default: $MSIF_CELERY_BROKER)")
    parser.add_argument("--max-runs", type=int, default=DEFAULT_MAX_RUNS, metavar="N",
                        help=f"with --executor celery: per-shard runs in flight at once (default {DEFAULT_MAX_RUNS})")


def uses_celery(args: argparse.Namespace) -> bool:
    chosen = args.executor or os.environ.get(EXECUTOR_ENV, "").strip().lower() or "default"
    return chosen == "celery"


def register_worker(subparsers) -> None:
    p = subparsers.add_parser(
        "worker", help="start a Celery worker for `msif materialize --executor celery`",
        description="Runs `celery -A dagster_celery.app worker` with msif's broker settings; it runs steps of any "
                    "msif lake whose runs it is sent, so it needs the lake's and inputs' paths and the runs' Dagster "
                    "instance storage (SQLite files in a shared directory, or PostgreSQL) reachable from here. Heavy steps "
                    f"(embeddings, factors, gradients, scores) go to the queue {GPU_QUEUE!r}, the others to {DEFAULT_QUEUE!r}. "
                    "$MSIF_CELERY_BACKEND and $MSIF_CELERY_VISIBILITY_TIMEOUT must be those of `msif materialize`.")
    p.add_argument("--broker", default=None, help="Celery broker URL (default: $MSIF_CELERY_BROKER)")
    p.add_argument("--queue", "-Q", action="append", default=None,
                   help=f"a queue to take steps from; repeat for several (default: {DEFAULT_QUEUE} and {GPU_QUEUE})")
    p.add_argument("--name", "-n", default=None, help="worker name, e.g. gpu1 (becomes gpu1@<host>)")
    p.add_argument("--concurrency", "-c", type=int, default=1, help="steps at once (default 1: one device per worker)")
    p.add_argument("--loglevel", "-l", default="INFO")
    p.set_defaults(handler=cmd_worker)
