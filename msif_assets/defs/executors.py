"""Where a run's steps execute.

Default: Dagster's own choice (the multiprocess executor for jobs, in-process for ``msif
materialize``), unchanged. With ``MSIF_EXECUTOR=celery`` and ``MSIF_CELERY_BROKER`` (e.g.
``redis://host:6379/0``) the Definitions' jobs run each step as a task on Celery workers
(``dagster-celery``): light steps on Celery's default queue ``dagster``, heavy ones (embeddings,
factor statistics and merges, query gradients, scores: :data:`HEAVY_OP_TAGS`) on the ``gpu``
queue, so only workers started with ``-Q gpu`` run them. ``MSIF_CELERY_BACKEND`` names the
result backend (default: the broker, which must then be Redis).

Workers need the same code importable and the run's Dagster instance (``$DAGSTER_HOME``:
SQLite in a shared directory on one machine, PostgreSQL across machines), and the lake and
input paths as the runner sees them. ``msif worker`` starts one (``app/cluster.py``).

A worker killed mid-step loses no step: tasks are acknowledged after they ran
(``task_acks_late``), so the broker hands a dead worker's task to another worker once the
broker's ``visibility_timeout`` has passed (``MSIF_CELERY_VISIBILITY_TIMEOUT`` seconds, default
7200: it must exceed the longest step, or a live worker's step is handed out a second time).
Every step replaces its outputs atomically, so a step that runs twice writes the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import dagster as dg

from ..config import ConfigError

GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "dagster"  # dagster-celery's task_default_queue: where untagged (light) steps go
QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG (not imported: celery is loaded only when used)
HEAVY_OP_TAGS: Mapping[str, str] = {QUEUE_TAG: GPU_QUEUE}

EXECUTOR_ENV = "MSIF_EXECUTOR"
BROKER_ENV = "MSIF_CELERY_BROKER"
BACKEND_ENV = "MSIF_CELERY_BACKEND"
VISIBILITY_ENV = "MSIF_CELERY_VISIBILITY_TIMEOUT"
DEFAULT_VISIBILITY_TIMEOUT = 7200


@dataclass(frozen=True)
class CelerySettings:
    """The broker and result backend every producer and worker of one cluster shares."""

    broker: str
    backend: str | None = None  # None: the broker (a Redis URL)
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT

    @property
    def result_backend(self) -> str:
        return self.backend or self.broker

    def app_config(self) -> dict[str, Any]:
        """Celery settings beyond broker and backend (``config_source``), for producers and workers."""
        return {
            "task_acks_late": True,  # a task leaves the broker only once it ran …
            "task_reject_on_worker_lost": True,  # … and goes back to it when its worker process died
            "worker_prefetch_multiplier": 1,  # a worker holds no task it does not run
            # dagster-celery's own publish retries, plus how long a taken task may stay unacknowledged
            "broker_transport_options": {
                "max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
                "visibility_timeout": self.visibility_timeout,
                # workers look for a dead worker's tasks every ≤10 s (kombu's default: every 100 s)
                "unacked_restore_interval": max(1, min(10, self.visibility_timeout // 10)), "unacked_restore_throttle": 1,
            },
        }

    def executor_config(self) -> dict[str, Any]:
        """The ``celery_executor`` config (also the worker's ``execution: config:`` YAML block)."""
        return {"broker": self.broker, "backend": self.result_backend, "config_source": self.app_config()}

    def executor(self) -> dg.ExecutorDefinition:
        from dagster_celery import celery_executor

        return celery_executor.configured(self.executor_config(), name="celery")

    def to_dict(self) -> dict[str, Any]:
        return {"broker": self.broker, "backend": self.backend, "visibility_timeout": self.visibility_timeout}


def celery_settings(environ: Mapping[str, str] | None = None, broker: str | None = None) -> CelerySettings:
    """Celery settings from the environment (``broker`` overrides ``MSIF_CELERY_BROKER``)."""
    env = os.environ if environ is None else environ
    broker = broker or env.get(BROKER_ENV, "").strip()
    if not broker:
        raise ConfigError(f"the celery executor needs a broker: set {BROKER_ENV}, e.g. redis://host:6379/0")
    raw_timeout = env.get(VISIBILITY_ENV, "").strip() or str(DEFAULT_VISIBILITY_TIMEOUT)
    try:
        timeout = int(raw_timeout)
        if timeout <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{VISIBILITY_ENV}={raw_timeout!r}: give a positive number of seconds (longer than the longest step)") from None
    return CelerySettings(broker=broker, backend=env.get(BACKEND_ENV, "").strip() or None, visibility_timeout=timeout)


def configured_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """The executor ``$MSIF_EXECUTOR`` names: None (Dagster's default) when unset or ``default``,
    the Celery executor for ``celery``; anything else is a :class:`ConfigError`."""
    env = os.environ if environ is None else environ
    kind = env.get(EXECUTOR_ENV, "").strip().lower()
    if kind in ("", "default"):
        return None
    if kind == "celery":
        return celery_settings(env).executor()
    raise ConfigError(f"{EXECUTOR_ENV}={env.get(EXECUTOR_ENV)!r}: use celery, or leave it unset for the default executor")
