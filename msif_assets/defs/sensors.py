"""Sensors and the schedule: new inbox files become shard partitions, changed inputs are
observed (and so refresh only what depends on them), and declarative automation runs the rest."""


import json
import os

import dagster as dg

from ..pipeline.corpus import scan_inbox
from .corpus import SHARDS, inbox_files, inbox_observations
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


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING, target=dg.AssetSelection.assets(inbox_files.key))
def inbox_sensor(context: dg.SensorEvaluationContext, inputs: InputsResource) -> dg.SensorResult:
    """A new file in the inbox adds a shard partition; a new or changed file is observed as a
    new ``inbox_files`` data version, so automation (re-)ingests its shard and refreshes what
    depends on it. Files not read (other suffixes, hidden, outside the inbox) are logged."""
    scan = scan_inbox(inputs.path("inbox"))
    seen = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(SHARDS.name))
    new = sorted(set(scan.shards) - known)
    vanished = sorted(known - set(scan.shards))
    problems = scan.problems
    if not isinstance(seen, dict) or "problems" not in seen:  # a cursor from before: log everything once
        seen = {"problems": [], "vanished": []}
    for problem in problems:
        if problem not in seen["problems"]:
            context.log.warning(f"inbox: {problem}")
    if vanished and vanished != seen["vanished"]:
        context.log.warning(f"shard files gone from the inbox (their data stays in the lake): {vanished}")
    # partitions are added after the events are stored, so observe the new shards by name
    events = inbox_observations(context.instance, scan, shards=known | set(new))
    return dg.SensorResult(
        asset_events=events,
        dynamic_partitions_requests=[SHARDS.build_add_request(new)] if new else [],
        cursor=json.dumps({"problems": problems, "vanished": vanished}),
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
