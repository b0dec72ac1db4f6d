"""Pipeline-level refresh timing (issue "Performance", item 4).

On a small user-brought world (``tests/defs/byo_world.py``: real tokenizer, two real GPT-NeoX
model directories, an inbox of JSONL shards), with the real Dagster definitions, automation
conditions and in-process runner, three phases are timed:

1. a full materialization of a lake holding ``shards - 1`` shards;
2. the refresh after one new shard lands in the inbox (the ``shards``-th);
3. the refresh after the fine-tuned model directory changes.

Each phase records how many asset partitions and runs it executed and its fraction of the full
materialization's wall time. The models are tiny on purpose: what is measured is which part of
the lineage a change touches, not model compute (the engine phases cover that).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .measure import Meter, Phase

_REPO = Path(__file__).resolve().parents[1]


def _world():
    if str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))
    from tests.defs import byo_world

    return byo_world


def pipeline_refresh_phases(meter: Meter, shards: int = 10, root: Path | None = None) -> list[Phase]:
    """Full materialization of ``shards - 1`` shards, then the refresh after one new shard and
    after a new fine-tuned model; phases have ``engine="pipeline"`` and ``extra`` holding
    ``asset_partitions``, ``runs``, ``executed`` and ``fraction_of_full`` (wall time)."""
    import logging
    import warnings

    import dagster as dg

    from msif_assets.app import runner

    from transformers.utils import logging as hf_logging

    logging.getLogger("dagster").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*is currently in beta")
    hf_logging.disable_progress_bar()

    world = _world()
    root = Path(root or tempfile.mkdtemp(prefix="msif-refresh-"))
    inputs = world.make_world(root, n_shards=shards - 1)
    queries = Path(inputs["queries"])  # fixed completions: the model change is the only change
    rows = [json.loads(line) for line in queries.read_text().splitlines()]
    world.write_jsonl(queries, [{**r, "completion": r.get("completion") or " Rome"} for r in rows])
    defs = world.byo_definitions(root, inputs, factor_shards=[f"shard-{i}" for i in range(shards - 1)])
    instance = dg.DagsterInstance.ephemeral()

    def record(phase: Phase, run_log) -> Phase:
        phase.extra.update(asset_partitions=len(run_log.executed), runs=run_log.runs,
                           executed=[f"{key}[{part}]" if part else key for key, part in run_log.executed])
        return phase

    with meter.phase(f"full materialization ({shards - 1} shards)", engine="pipeline") as full:
        runner.register_shards(instance, inputs["inbox"])
        runner.observe_inputs(defs, instance)
        full_log = runner.execute(defs, instance, runner.all_requests(defs, instance))
    _, cursor = runner.automation_tick(defs, instance, None)

    def refreshed(name: str) -> Phase:
        nonlocal cursor
        with meter.phase(name, engine="pipeline") as phase:
            runner.register_shards(instance, inputs["inbox"])
            runner.observe_inputs(defs, instance)
            run_log, cursor = runner.refresh(defs, instance, cursor)
        return record(phase, run_log)

    world.write_jsonl(Path(inputs["inbox"]) / f"shard-{shards - 1}.jsonl", world.shard_docs(shards - 1))
    new_shard = refreshed(f"refresh: 1 new shard of {shards}")
    world.perturb(Path(inputs["pretrained_model"]), Path(inputs["finetuned_model"]), seed=11)
    new_ft = refreshed("refresh: new fine-tuned model")
    phases = [record(full, full_log), new_shard, new_ft]
    for phase in phases:
        phase.extra["fraction_of_full"] = phase.seconds / full.seconds
    return phases


def format_pipeline_table(phases: list[dict]) -> str:
    """Rows: phase, wall s, fraction of the full materialization, asset partitions, runs."""
    lines = [f"{'pipeline phase':<41} {'wall s':>8} {'fraction':>8} {'asset partitions':>17} {'runs':>5}"]
    for p in phases:
        x = p["extra"]
        lines.append(f"{p['name']:<41} {p['seconds']:8.1f} {x['fraction_of_full']:8.3f} "
                     f"{x['asset_partitions']:>17} {x['runs']:>5}")
    return "\n".join(lines)
