"""Sensors and the schedule: new inbox files become shard partitions, changed inputs are
observed (and so refresh only what depends on them), and declarative automation runs the rest."""


import json
import os

import dagster as dg

from ..pipeline.corpus import inbox_shards
from .corpus import SHARDS, corpus_shards
from .inputs import SOURCES
from .resources import InputsResource

observe_inputs_job = dg.define_asset_job(
    "observe_inputs", selection=dg.AssetSelection.assets(*[s.key for s in SOURCES]), description="Hash the models, fine-tuning data and queries."
)


def _stat_signature(path: str) -> str:
    """Cheap change detector (sizes + mtimes); the observation itself hashes contents."""
    parts = []
    for root, _dirs, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]:
        for name in sorted(files):
            full = os.path.join(root, name)
            if os.path.exists(full):
                st = os.stat(full)
                parts.append(f"{full}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING, asset_selection=[corpus_shards])
def inbox_sensor(context: dg.SensorEvaluationContext, inputs: InputsResource) -> dg.SensorResult:
    """A new file in the inbox adds a shard partition; a changed file re-reads its shard."""
    seen = json.loads(context.cursor) if context.cursor else {}
    current = {shard: _stat_signature(str(files[0])) for shard, files in inbox_shards(inputs.path("inbox")).items()}
    known = set(context.instance.get_dynamic_partitions(SHARDS.name))
    new = sorted(set(current) - known)
    changed = sorted(s for s in current if s in known and s in seen and seen[s] != current[s])
    vanished = sorted(known - set(current))
    if vanished:
        context.log.warning(f"shard files gone from the inbox (their data stays in the lake): {vanished}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=s, asset_selection=[corpus_shards.key], run_key=f"{s}:{current[s]}") for s in changed],
        dynamic_partitions_requests=[SHARDS.build_add_request(new)] if new else [],
        cursor=json.dumps(current),
    )


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING, job=observe_inputs_job)
def input_change_sensor(context: dg.SensorEvaluationContext, inputs: InputsResource):
    """Observe the models, fine-tuning data and queries when their files change on disk."""
    names = ("pretrained_model", "finetuned_model", "finetune_data", "queries")
    signature = "||".join(_stat_signature(str(inputs.path(n))) for n in names)
    if signature == (context.cursor or ""):
        return dg.SkipReason("inputs unchanged")
    context.update_cursor(signature)
    return dg.RunRequest(run_key=str(abs(hash(signature))))


periodic_refresh = dg.ScheduleDefinition(
    name="periodic_refresh", job=observe_inputs_job, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly sweep: observe every input; automation refreshes whatever changed. Off by default.",
)

automation_sensor = dg.AutomationConditionSensorDefinition(
    "msif_refresh", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=30,
)

SENSORS = [inbox_sensor, input_change_sensor, automation_sensor]
SCHEDULES = [periodic_refresh]
