"""The main command's path, end to end, on the tiny default world: build the world and its
models, run the whole lineage, and check the results in SQL; a second run recomputes nothing."""

import dagster as dg
import pytest

from msif_assets.defs.build import build_definitions
from msif_assets.app.lineage import bring_up_to_date
from msif_assets.config import MsifConfig
from msif_assets.lake.catalog import Catalog


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = MsifConfig(lake_root=str(root / "lake"), demo_dir=str(root / "world"), demo_size="tiny")
    defs = build_definitions(config)
    instance = dg.DagsterInstance.ephemeral()
    first = bring_up_to_date(config, defs, instance)
    return config, defs, instance, first


def test_lineage_scores_every_method_for_every_query(demo):
    config, _, _, (ran, _, shards, _) = demo
    assert shards and ("influence_scores", shards[0]) in ran.keys()
    catalog = Catalog.open(config.lake_root)
    per_method = catalog.query(
        "SELECT method, count(DISTINCT query_id) AS q, count(DISTINCT (damping_kind, damping)) AS d FROM influence GROUP BY method"
    ).to_pylist()
    n_queries = catalog.query("SELECT count(*) AS n FROM queries").column("n")[0].as_py()
    assert {r["method"] for r in per_method} == {"ms-if", "ss-if", "gdp", "repsim", "bm25"}
    assert all(r["q"] == n_queries for r in per_method)
    assert {r["d"] for r in per_method if r["method"] in ("ms-if", "ss-if")} == {5}


def test_every_chunk_scored_and_gold_documents_present(demo):
    config = demo[0]
    catalog = Catalog.open(config.lake_root)
    missing = catalog.query(
        "SELECT q.query_id, g.doc_id FROM queries q, unnest(q.gold_doc_ids) AS g(doc_id) "
        "WHERE NOT EXISTS (SELECT 1 FROM influence i WHERE i.query_id = q.query_id AND i.doc_id = g.doc_id AND i.method = 'ms-if')"
    )
    assert missing.num_rows == 0
    chunks = catalog.query("SELECT count(*) AS n FROM chunks").column("n")[0].as_py()
    per_query = catalog.query(
        "SELECT max(c) AS hi, min(c) AS lo FROM (SELECT query_id, count(*) AS c FROM influence "
        "WHERE method = 'gdp' GROUP BY query_id)"
    ).to_pylist()[0]
    assert per_query["hi"] == per_query["lo"] == chunks



def test_first_run_builds_the_default_world_once(demo):
    """One materialization of ``default_world`` per run (the lineage's request for everything
    missing must not build it a second time)."""
    instance = demo[2]
    assert len(instance.fetch_materializations(dg.AssetKey("default_world"), limit=10).records) == 1

def test_second_run_recomputes_nothing(demo):
    config, defs, instance, _ = demo
    ran, refreshed, new_shards, _ = bring_up_to_date(config, defs, instance)
    assert new_shards == []
    assert ran.executed == [] and refreshed.executed == []
    world = instance.fetch_materializations(dg.AssetKey("default_world"), limit=1).records[0]
    assert world.asset_materialization.metadata["steps_run"].value == "none (cached)"
