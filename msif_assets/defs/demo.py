"""The embedded default world as assets: a synthetic fact world and two GPT-NeoX models
trained here. They write the files the lineage's inputs observe (inbox, model directories,
fine-tuning data, queries with gold labels), exactly as a user's files would be."""

import json
from pathlib import Path

import dagster as dg

from ..demo.settings import demo_size
from .automation import text_version
from ..config import MsifConfig

GROUP = "default_world"


class DemoResource(dg.ConfigurableResource):
    """Where and how large the default world is (``[demo] dir/size`` in msif.toml)."""

    dir: str
    size: str = "default"


def demo_resource(config: MsifConfig) -> DemoResource:
    return DemoResource(dir=config.demo_dir, size=config.demo_size)


def write_queries_with_gold(world_dir: Path, max_queries: int) -> Path:
    """The held-out queries (the first ``max_queries``) with their gold documents inline."""
    gold: dict[str, list[str]] = {}
    for line in (world_dir / "gold.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        gold.setdefault(row["query_id"], []).append(row["doc_id"])
    rows = [json.loads(line) for line in (world_dir / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    out = world_dir / "lake_queries.jsonl"
    from ..lake.atomic import atomic_write_text

    atomic_write_text(out, "".join(json.dumps({**r, "gold_doc_ids": gold[r["query_id"]]}) + "\n" for r in rows[:max_queries]))
    return out


@dg.asset(group_name=GROUP, kinds={"pytorch"}, description="Synthetic fact world + GPT-NeoX pre-trained on it + its full fine-tune on QA.")
def default_world(context: dg.AssetExecutionContext, demo: DemoResource) -> dg.MaterializeResult:
    from ..demo.build import build_default_world

    size = demo_size(demo.size)
    result = build_default_world(demo.dir, size.world, size.train)
    queries = write_queries_with_gold(Path(result["paths"]["world_dir"]), size.max_queries)
    m, t = result["metrics"], result["timings"]
    context.log.info(f"default world: ran {result['ran']}, reused {result['skipped']}")
    table = "\n".join(f"| {k} | {v:.4g} |" for k, v in m.items() if isinstance(v, (int, float)))
    return dg.MaterializeResult(
        metadata={
            "heldout_qa_accuracy": m.get("heldout_qa_accuracy"), "relative_param_distance": m.get("relative_param_distance"),
            "build_seconds": t.get("total_s"), "steps_run": ", ".join(result["ran"]) or "none (cached)",
            "metrics": dg.MetadataValue.md("| metric | value |\n|---|---|\n" + table), "queries_file": str(queries),
        },
        data_version=text_version(*sorted(result["hashes"].values()), queries.read_text(encoding="utf-8")),
    )


DEMO_ASSETS = [default_world]
DEMO_CHECKS: list = []
