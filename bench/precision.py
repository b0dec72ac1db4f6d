"""Precision of the factor statistics, measured where it bites: the same default world
materialized under several compute settings, compared per method and damping with the
float64 lake (fact-tracing MRR, and the Spearman/Pearson correlation of the score columns).

    .venv/bin/msif demo --config f64.toml    # [lake] root = "lake-f64", [compute] dtype = "float64"
    .venv/bin/python -m bench.precision --reference lake-f64 --lakes lake lake-f32model

Writes bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SCORES = ("SELECT query_id, chunk_id, method, coalesce(damping_kind, '') AS kind, coalesce(damping, 0) AS damping, score "
          "FROM influence WHERE method IN ('ms-if', 'ss-if', 'gdp')")
MRR = ("SELECT method, coalesce(damping_kind, '') AS kind, coalesce(damping, 0) AS damping, value AS mrr FROM eval_summary "
       "WHERE metric = 'full/mrr' AND method IN ('ms-if', 'ss-if', 'gdp')")


def _read(lake: str) -> tuple[dict, dict]:
    from msif_assets.lake.catalog import Catalog

    with Catalog.open(lake, timeout_s=0) as catalog:
        scores = {}
        for r in catalog.query(SCORES).to_pylist():
            scores.setdefault((r["method"], r["kind"], r["damping"]), {})[(r["query_id"], r["chunk_id"])] = r["score"]
        mrr = {(r["method"], r["kind"], r["damping"]): r["mrr"] for r in catalog.query(MRR).to_pylist()}
    return scores, mrr


def main(argv: list[str] | None = None) -> int:
    from msif_assets.engine.metrics import pearson, spearman

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="the float64 lake")
    parser.add_argument("--lakes", nargs="+", required=True)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision.json"))
    args = parser.parse_args(argv)
    ref_scores, ref_mrr = _read(args.reference)
    rows = []
    for lake in args.lakes:
        scores, mrr = _read(lake)
        for key in sorted(ref_scores):
            pairs = sorted(set(ref_scores[key]) & set(scores.get(key, {})))
            a = [scores[key][p] for p in pairs]
            b = [ref_scores[key][p] for p in pairs]
            rows.append({"lake": lake, "method": key[0], "damping": f"{key[1][:3]}:{key[2]:g}" if key[1] else "—",
                         "pairs": len(pairs), "spearman": spearman(a, b), "pearson": pearson(a, b),
                         "mrr": mrr.get(key), "mrr_float64": ref_mrr.get(key)})
    print(f"{'lake':<16}{'method':<7}{'damping':<12}{'spearman':>10}{'pearson':>10}{'MRR':>8}{'MRR f64':>9}")
    for r in rows:
        print(f"{r['lake']:<16}{r['method']:<7}{r['damping']:<12}{r['spearman']:>10.5f}{r['pearson']:>10.5f}"
              f"{r['mrr'] or float('nan'):>8.3f}{r['mrr_float64'] or float('nan'):>9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"reference": args.reference, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
