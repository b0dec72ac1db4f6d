"""What ``msif demo`` prints: the world, the top influential documents for a few queries,
a SQL example, and the fact-tracing table."""

import json
from pathlib import Path

from .render import format_table
from ..lake.catalog import Catalog

TOP_SQL = """SELECT rank, doc_id, round(score, 3) AS score, round(score_mlp / nullif(score, 0), 2) AS mlp_share, chunk_text
FROM influence_with_text
WHERE query_id = $q AND method = 'ms-if' AND damping_kind = 'relative'
ORDER BY rank LIMIT 5"""

EXAMPLE_SQL = """SELECT method, damping_kind, damping, round(avg(mlp_share), 3) AS mlp_share,
       round(avg(attn_share), 3) AS attn_share, count(*) AS queries
FROM mlp_attn_share GROUP BY ALL ORDER BY method, damping_kind, damping"""


def _world_metrics(config) -> dict:
    manifest = Path(config.demo_dir) / "build.json"
    if not manifest.is_file():
        return {}
    steps = json.loads(manifest.read_text())["steps"]
    return {k: v for step in steps.values() for k, v in step.get("metrics", {}).items()}


def print_demo_report(config, ran, refreshed, seconds: float, n_queries: int = 3) -> None:
    metrics = _world_metrics(config)
    print("\n=== msif: the embedded default world ===")
    if metrics:
        print(
            f"fine-tuned model answers {metrics.get('heldout_qa_accuracy', float('nan')):.0%} of held-out questions "
            f"(facts seen only in pre-training; pre-trained model alone: {metrics.get('pretrained_heldout_qa_accuracy', float('nan')):.0%}); "
            f"‖θ_ft−θ_pt‖/‖θ_pt‖ = {metrics.get('relative_param_distance', float('nan')):.3f}"
        )
    print(f"lineage: {len(ran.executed) + len(refreshed.executed)} asset partitions in {ran.runs + refreshed.runs} runs, {seconds:.0f}s; lake at {config.lake_root}")
    catalog = Catalog.open(config.lake_root)
    try:
        queries = catalog.query("SELECT query_id, prompt, completion, gold_doc_ids FROM queries ORDER BY query_id LIMIT $n", {"n": n_queries}).to_pylist()
        for q in queries:
            gold = set(q["gold_doc_ids"] or [])
            print(f"\nquery {q['query_id']}: {q['prompt']!r} → {q['completion']!r}   (gold: {', '.join(sorted(gold)) or 'n/a'})")
            top = catalog.query(TOP_SQL, {"q": q["query_id"]})
            rows = top.to_pylist()
            for r in rows:
                mark = "★" if r["doc_id"] in gold else " "
                text = (r["chunk_text"] or "").replace("\n", " ")
                print(f"  {mark} #{r['rank']:<2} {r['doc_id']:<14} {r['score']:>10.3f}  {text[:90]}")
        print("\nSQL (msif sql \"…\"):\n" + EXAMPLE_SQL)
        print(format_table(catalog.query(EXAMPLE_SQL)))
        _print_fact_tracing(catalog)
    finally:
        catalog.close()
    print("\nExplore: `make ui` (Dagster UI), `.venv/bin/msif top <query_id>`, `.venv/bin/msif sql \"SELECT * FROM top_k LIMIT 20\"`.")


def _print_fact_tracing(catalog: Catalog) -> None:
    views = {r["view_name"] for r in catalog.query("SELECT view_name FROM duckdb_views() WHERE NOT internal").to_pylist()}
    if "fact_tracing" not in views:
        return
    table = catalog.query(
        "SELECT * FROM fact_tracing ORDER BY protocol, method, damping_kind, damping"
    )
    if table.num_rows:
        print("\nFact tracing (MRR, Recall@10 any / fraction of gold) — ★ = gold source document:")
        print(format_table(table))
