"""Reading views on a hand-built lake (issue 14): influence_normalized's share and percentile,
query_summary, and no eval_ranking anywhere (nothing writes it)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from msif_assets.app.cli import build_parser
from msif_assets.lake.catalog import BASE_VIEWS, Catalog
from msif_assets.lake.tables import EVAL_TABLES, TableSchemaError, write_eval

from .lake_data import SHARD_SCORES

REPO = Path(__file__).resolve().parents[2]


def test_share_and_percentile_across_shards(small_lake):
    with Catalog.open(small_lake.root) as catalog:
        rows = catalog.query("SELECT doc_id, rank, score, share, percentile, n_scored FROM influence_normalized "
                             "ORDER BY rank").to_pylist()
        text = catalog.query("SELECT share, percentile FROM influence_with_text ORDER BY rank").to_pylist()
    scores = {d: s for shard in SHARD_SCORES.values() for d, s in shard.items()}
    total = sum(abs(s) for s in scores.values())
    assert [r["doc_id"] for r in rows] == sorted(scores, key=lambda d: -scores[d])
    for r in rows:
        assert r["share"] == pytest.approx(r["score"] / total) and r["n_scored"] == len(scores)
    assert sum(abs(r["share"]) for r in rows) == pytest.approx(1.0)
    assert any(r["share"] < 0 for r in rows)  # shares keep the score's sign
    assert [r["percentile"] for r in rows] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert text == [{"share": r["share"], "percentile": r["percentile"]} for r in rows]


def test_query_summary_counts_scored_candidates(small_lake):
    with Catalog.open(small_lake.root) as catalog:
        rows = catalog.query("SELECT * FROM query_summary").to_pylist()
    assert [(r["query_id"], r["n_scored"], r["n_score_groups"]) for r in rows] == [("q1", 4, 1)]


def test_empty_lake_reading_views_are_empty(tmp_path):
    with Catalog.open(tmp_path / "none") as catalog:
        for view in ("influence_normalized", "query_summary"):
            assert catalog.query(f"SELECT count(*) AS n FROM {view}").column("n")[0].as_py() == 0


def test_no_eval_ranking_table_view_or_mention(layout, tmp_path):
    assert "eval_ranking" not in EVAL_TABLES and "eval_ranking" not in BASE_VIEWS
    with pytest.raises(TableSchemaError, match="unknown evaluation table 'eval_ranking'"):
        write_eval(layout, "eval_ranking", pa.table({"x": [1]}))
    with Catalog.open(tmp_path / "none") as catalog:
        assert "eval_ranking" not in catalog.views
        assert {"fact_tracing_full", "fact_tracing_rerank"} <= set(catalog.empty_views)
    docs = [REPO / "README.md", *sorted((REPO / "sql").glob("*.sql")),
            REPO / "msif_assets/lake/catalog.py", REPO / "msif_assets/app/cli.py"]
    assert [str(p) for p in docs if "eval_ranking" in p.read_text(encoding="utf-8")] == []
    sql_help = build_parser()._subparsers._group_actions[0].choices["sql"].format_help()
    assert "eval_ranking" not in sql_help and "influence_normalized" in sql_help
