"""Issue 14, what the UI shows: the default world's edges in the lineage graph, the
fact-tracing plot's damping axes, the influence_scores metadata preview and the
``refresh_all`` job (run on a tiny user-brought world)."""

import datetime as dt
import re

import dagster as dg
import pyarrow as pa
import pytest

from msif_assets.config import MsifConfig
from msif_assets.defs.build import build_definitions
from msif_assets.defs.inputs import SOURCES
from msif_assets.defs.scores import preview
from msif_assets.lake import tables
from msif_assets.pipeline import evaluation as ev

from .byo_world import byo_definitions, make_world

OBSERVED = {*(s.key for s in SOURCES), dg.AssetKey("inbox_files")}


@pytest.fixture(scope="module")
def demo_defs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return build_definitions(MsifConfig(lake_root=str(root / "lake"), demo_dir=str(root / "demo"), demo_size="tiny"))


# --- 1. default_world has real edges -------------------------------------------------------

def test_default_world_is_upstream_of_every_input_it_writes(demo_defs):
    graph = demo_defs.resolve_asset_graph()
    world = dg.AssetKey("default_world")
    assert graph.get(world).child_keys == OBSERVED  # inbox, both models' files, fine-tuning data, queries
    for key in OBSERVED:
        assert world in graph.get(key).parent_keys
        assert not graph.get(key).is_materializable  # still observed, never materialized
    # so the world reaches the whole lineage through them
    assert {"corpus_shards", "queries", "ft_factors", "influence_scores"} <= {
        k.to_user_string() for k in dg.AssetSelection.assets(world).downstream().resolve(graph)}
    demo_defs.get_repository_def()  # sensors and jobs still resolve against the rewired inputs


def test_a_user_brought_world_has_no_default_world(tmp_path):
    defs = build_definitions(MsifConfig(lake_root=str(tmp_path / "lake"), inputs={
        "inbox": str(tmp_path), "pretrained_model": str(tmp_path), "finetuned_model": str(tmp_path),
        "finetune_data": str(tmp_path / "f.jsonl"), "queries": str(tmp_path / "q.jsonl")}))
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("default_world") not in graph.get_all_asset_keys()
    assert all(not graph.get(k).parent_keys for k in OBSERVED)


# --- 2. relative dampings are not drawn on the absolute-damping axis -------------------------

def _summary() -> pa.Table:
    now, rows = dt.datetime.now(dt.timezone.utc), []
    for protocol in ev.PROTOCOLS:
        for metric in ev.SUMMARY_METRICS:
            for method in ("ms-if", "ss-if"):
                for kind, value in (("absolute", 1e-4), ("absolute", 1e-2), ("absolute", 0.1), ("relative", 0.1)):
                    rows.append({"method": method, "damping": value, "damping_kind": kind, "metric": f"{protocol}/{metric}",
                                 "value": 0.9 if kind == "relative" else 0.5, "n_queries": 2, "ft_model": "m", "computed_at": now})
            rows.append({"method": "gdp", "damping": None, "damping_kind": None, "metric": f"{protocol}/{metric}",
                         "value": 0.4, "n_queries": 2, "ft_model": "m", "computed_at": now})
    return pa.Table.from_pylist(rows, schema=tables.EVAL_SUMMARY.schema)


def test_plot_data_keeps_relative_and_absolute_dampings_on_separate_axes():
    panels = ev.fact_tracing_plot_data(_summary())
    assert len(panels) == len(ev.PROTOCOLS) * 2 * 3  # per protocol: an absolute and a relative row of 3 metrics
    for panel in panels:
        labels = {label for s in panel.series for _, _, label in s.points}
        prefix = {"absolute": "abs:", "relative": "rel:"}[panel.axis]
        assert labels and all(label.startswith(prefix) for label in labels), (panel.title, labels)
        assert panel.axis in panel.xlabel and panel.axis in panel.title
        assert panel.baselines == (("gdp", 0.4),)
    relative = [p for p in panels if p.axis == "relative"]
    assert all({s.method: s.points for s in p.series} == {"ms-if": ((0.1, 0.9, "rel:0.1"),), "ss-if": ((0.1, 0.9, "rel:0.1"),)}
               for p in relative)
    absolute = next(p for p in panels if p.axis == "absolute")
    assert [x for x, _, _ in absolute.series[0].points] == [1e-4, 1e-2, 0.1]  # rel:0.1 is not the point at λ = 0.1


def test_the_figure_draws_relative_points_in_their_own_labelled_panels(tmp_path):
    fig = ev.fact_tracing_figure(_summary())
    for ax in fig.axes:
        kinds = {line.get_label().rsplit("(", 1)[-1].rstrip(")") for line in ax.get_lines() if "(" in line.get_label()}
        assert len(kinds) == 1, (ax.get_title(), kinds)  # never both kinds on one x axis
        if "relative" in ax.get_title():
            assert kinds == {"relative"} and "relative damping" in ax.get_xlabel()
            assert {t.get_text() for t in ax.texts} == {"rel:0.1"}  # each point labelled
            assert all(line.get_marker() == "s" for line in ax.get_lines() if "(" in line.get_label())
        else:
            assert kinds == {"absolute"} and "absolute damping" in ax.get_xlabel()
    assert ev.plot_fact_tracing(_summary(), tmp_path / "ft.png").stat().st_size > 0


# --- 3. the influence_scores preview ----------------------------------------------------------

def _scores() -> pa.Table:
    rows, now = [], dt.datetime.now(dt.timezone.utc)
    groups = [("ms-if", "absolute", 1e-4), ("ms-if", "absolute", 1e-3), ("ms-if", "relative", 0.1), ("ss-if", "relative", 0.1),
              ("gdp", None, None), ("bm25", None, None)]
    for q in ("q0000", "q0001"):
        for method, kind, value in groups:
            for rank in range(1, 6):
                chunk = f"d{(rank + (kind == 'relative')) % 5}#0"
                rows.append({"query_id": q, "doc_id": chunk[:-2], "chunk_id": chunk, "shard": "s", "method": method,
                             "damping": value, "damping_kind": kind, "score": 1.0 / rank, "score_mlp": None, "score_attn": None,
                             "rank": rank, "pt_model": "p", "ft_model": "f", "computed_at": now})
    return pa.Table.from_pylist(rows, schema=tables.SCORES.schema)


def test_the_preview_names_method_damping_rank_document_and_text():
    texts = {f"d{i}#0": f"Person {i} was born in | City {i} .  " + "more words " * 20 for i in range(5)}
    md = preview(_scores(), texts)
    rows = [line for line in md.splitlines() if line.startswith("| `q")]
    assert len(rows) == 2 * 3  # top 3 per query, under one score group
    assert "**ms-if@rel:0.1**" in md and "| query | method | damping | rank | doc_id | score | text |" in md
    seen = set()
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        query, method, damping, rank, doc, _score, text = cells
        assert (method, damping) == ("ms-if", "rel:0.1")
        assert (query, rank) not in seen  # no query listed twice at one rank
        seen.add((query, rank))
        i = int(doc.strip("`")[1:])
        assert text.startswith(f"Person {i} was born in \\| City {i} . more words") and text.endswith("…") and len(text) <= 82
    assert "ms-if@abs:0.0001" in md and "ss-if@rel:0.1" in md and "gdp" in md  # the other groups are named


# --- 4. refresh_all, run on a tiny user-brought world (its influence_scores metadata: 3.) ---------

@pytest.fixture(scope="module")
def refreshed(tmp_path_factory):
    root = tmp_path_factory.mktemp("refresh_all")
    defs = byo_definitions(root, make_world(root))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def("refresh_all").execute_in_process(instance=instance)
    return defs, instance, result


def test_refresh_all_is_offered_for_the_default_world(demo_defs):
    job = demo_defs.resolve_job_def("refresh_all")
    assert job.partitions_def is None  # one run, no partition to pick: it adds the shards itself
    assert "Materialize all" in job.description


def test_refresh_all_materializes_every_partition_of_every_asset(refreshed):
    defs, instance, result = refreshed
    assert result.success
    graph = defs.resolve_asset_graph()
    shards = instance.get_dynamic_partitions("shards")
    assert shards == ["shard-0", "shard-1"]  # registered by the job, not by hand
    for key in graph.materializable_asset_keys:
        if graph.get(key).partitions_def is None:
            assert instance.get_latest_materialization_event(key) is not None, key
        else:
            assert set(instance.get_materialized_partitions(key)) == set(shards), key
    metadata = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT").event_specific_data.metadata
    assert metadata["new_shards"].value == "shard-0, shard-1" and metadata["asset_partitions"].value > 10


def test_influence_scores_metadata_preview_after_a_real_run(refreshed):
    _, instance, _ = refreshed
    record = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("influence_scores"), asset_partitions=["shard-0"]),
                                             limit=1).records[0]
    md = record.asset_materialization.metadata["top"].value
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in md.splitlines() if line.startswith("| `q-")]
    assert rows and "**ms-if@rel:0.1**" in md
    for cells in rows:
        assert cells[1:3] == ["ms-if", "rel:0.1"] and cells[3].isdigit() and cells[4].startswith("`s0-")
        assert re.search(r"(born in|met|likes)", cells[6]), cells  # the chunk's text
    assert len({(c[0], c[3]) for c in rows}) == len(rows)  # no query twice at one rank
    assert "ms-if@abs:0.001" in md  # the other damping is named, not repeated as rank 1
