"""Pipeline-level benchmark: how long the lineage takes to refresh after (a) one new shard
out of ten and (b) a new fine-tuned model, each against a full materialization of the same
lake. Uses the real Dagster definitions, automation conditions and in-process runner on a
small user-brought world (tests/defs/byo_world.py). Prints a table and writes JSON.

    python bench/refresh_bench.py [--out bench/results/refresh.json] [--shards 10]
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msif_assets.defs import runner  # noqa: E402
from tests.defs.byo_world import byo_definitions, make_world, perturb, shard_docs, write_jsonl  # noqa: E402


def timed_refresh(defs, instance, inbox, cursor):
    started = time.perf_counter()
    runner.register_shards(instance, inbox)
    runner.observe_inputs(defs, instance)
    ran, cursor = runner.refresh(defs, instance, cursor)
    return time.perf_counter() - started, ran, cursor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "refresh.json"))
    parser.add_argument("--shards", type=int, default=10)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="msif-refresh-"))
    inputs = make_world(root, n_shards=args.shards - 1)
    queries = Path(inputs["queries"])  # fixed completions: the model change is the only change
    rows = [json.loads(line) for line in queries.read_text().splitlines()]
    write_jsonl(queries, [{**r, "completion": r.get("completion") or " Rome"} for r in rows])
    factor_set = [f"shard-{i}" for i in range(args.shards - 1)]
    defs = byo_definitions(root, inputs, factor_shards=factor_set)
    instance = dg.DagsterInstance.ephemeral()

    started = time.perf_counter()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    full = runner.execute(defs, instance, runner.all_requests(defs, instance))
    full_s = time.perf_counter() - started
    _, cursor = runner.automation_tick(defs, instance, None)

    write_jsonl(Path(inputs["inbox"]) / f"shard-{args.shards - 1}.jsonl", shard_docs(args.shards - 1))
    shard_s, shard_ran, cursor = timed_refresh(defs, instance, inputs["inbox"], cursor)
    perturb(Path(inputs["pretrained_model"]), Path(inputs["finetuned_model"]), seed=11)
    ft_s, ft_ran, cursor = timed_refresh(defs, instance, inputs["inbox"], cursor)

    rows = [
        ("full materialization", full_s, len(full.executed), full.runs),
        (f"refresh: 1 new shard of {args.shards}", shard_s, len(shard_ran.executed), shard_ran.runs),
        ("refresh: new fine-tuned model", ft_s, len(ft_ran.executed), ft_ran.runs),
    ]
    print(f"{'phase':<34} {'seconds':>8} {'fraction':>8} {'asset partitions':>17} {'runs':>5}")
    for name, seconds, partitions, runs in rows:
        print(f"{name:<34} {seconds:8.1f} {seconds / full_s:8.2f} {partitions:>17} {runs:>5}")
    result = {
        "benchmark": "msif pipeline refresh vs full materialization",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "shards": args.shards,
        "phases": [{"name": n, "seconds": s, "fraction_of_full": s / full_s, "asset_partitions": p, "runs": r} for n, s, p, r in rows],
        "executed": {"new_shard": shard_ran.executed, "new_finetuned_model": ft_ran.executed},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
