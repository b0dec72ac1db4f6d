"""Pipeline refresh benchmark on its own (``run_bench.py`` runs it too): refresh after one new
shard of ten and after a new fine-tuned model, against a full materialization. Prints a table
and writes JSON.

    python bench/refresh_bench.py [--out bench/results/refresh.json] [--shards 10]
"""

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.measure import Meter  # noqa: E402
from bench.pipeline import format_pipeline_table, pipeline_refresh_phases  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "refresh.json"))
    parser.add_argument("--shards", type=int, default=10)
    args = parser.parse_args(argv)
    phases = [p.to_dict() for p in pipeline_refresh_phases(Meter(torch.device("cpu")), shards=args.shards)]
    print(format_pipeline_table(phases))
    result = {
        "benchmark": "msif pipeline refresh vs full materialization",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "shards": args.shards,
        "phases": phases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
