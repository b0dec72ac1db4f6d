"""``refresh_all``: one run, launched from the UI's Jobs page, that brings the whole lake up
to date — what ``msif materialize`` does.

The UI's "Materialize all" cannot do this for msif's graph: it opens a backfill over the
``shards`` dynamic partitions, which is empty until the inbox has been scanned (in the default
world, until ``default_world`` has written the inbox), and a backfill's roots must share one
partitioning, which ``corpus_shards[shard]``, ``queries`` and ``ft_factors`` do not. An asset
job over all assets is no better: launched per partition, it would run every unpartitioned
asset once per shard, and ``pt_eigenbasis`` before the other shards' statistics exist.

So the job's single op runs the in-process runner under the lake's lock: build the default world
(when the config brings nothing), observe the inputs, add a partition for every inbox file,
materialize what is missing and refresh what changed, in dependency order. Each step is a
run of its own in the same instance (tagged ``msif/runner: cli``), so the UI shows them all.
The op imports ``app.lineage`` lazily: that is the one place where ``defs`` calls the
application layer, because the runner *is* what the job runs.
"""

import logging

import dagster as dg

from ..config import MsifConfig


class _ToRunLog(logging.Handler):
    """The runner's progress lines (``msif_assets`` loggers, INFO) in the run's event log."""

    def __init__(self, context: dg.OpExecutionContext):
        super().__init__(logging.INFO)
        self.context = context

    def emit(self, record: logging.LogRecord) -> None:
        self.context.log.log(record.levelno, record.getMessage())


def build_refresh_all_job(config: MsifConfig) -> dg.JobDefinition:
    @dg.op(name="bring_lake_up_to_date", description="`msif materialize` in this run: everything missing, then whatever changed.")
    def bring_lake_up_to_date(context: dg.OpExecutionContext) -> None:
        from ..app.lineage import bring_up_to_date
        from .build import build_definitions

        logger = logging.getLogger("msif_assets")
        handler, level = _ToRunLog(context), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            ran, refreshed, new_shards, seconds = bring_up_to_date(config, build_definitions(config), context.instance)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        executed = [*ran.executed, *refreshed.executed]
        context.add_output_metadata({
            "asset_partitions": len(executed), "runs": ran.runs + refreshed.runs, "seconds": round(seconds, 1),
            "new_shards": ", ".join(new_shards) or "none",
            "materialized": dg.MetadataValue.md("\n".join(f"- `{key}`" + (f" [{part}]" if part else "") for key, part in executed) or "(nothing to do)"),
        })

    @dg.job(name="refresh_all", tags={"msif/job": "refresh_all"},
            description="Bring the whole lake up to date in one run (what `msif materialize` does): build the default world when "
                        "no inputs are configured, observe the inputs, add a shard partition per inbox file, materialize every "
                        "missing asset partition and refresh whatever changed. Launch it instead of \"Materialize all\".")
    def refresh_all():
        bring_lake_up_to_date()

    return refresh_all
