"""Reading results on a real materialized lake (issue 14): `msif top` shows one labelled
method@damping group by default (or every group with --all), takes damping labels, tells an
unknown query from an unscored one, shows share/percentile beside the raw score, and
`msif queries` lists the queries."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import dagster as dg
import pytest

from msif_assets.app import runner
from msif_assets.app.cli import main
from msif_assets.lake.catalog import Catalog

from ..defs.byo_world import byo_definitions, make_world

# abs:0.1 next to rel:0.1, so that a bare "0.1" really is ambiguous
DAMPINGS = ["rel:0.1", "abs:0.001", "abs:0.1"]
QUERY_IDS = ["q-eve", "q-fay", "q-gus"]


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    inputs = make_world(root, n_shards=2)
    defs = byo_definitions(root, inputs, all_chunks_below=100, dampings=DAMPINGS)
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    runner.execute(defs, instance, runner.all_requests(defs, instance))
    return root / "lake"


def _groups(lake, query_id: str) -> dict[str, int]:
    """label -> number of scored candidates, straight from the influence view."""
    with Catalog.open(lake) as catalog:
        rows = catalog.query("SELECT method, damping_kind, damping, count(*) AS n FROM influence "
                             "WHERE query_id = $q GROUP BY ALL", {"q": query_id}).to_pylist()
    label = lambda r: r["method"] if r["damping_kind"] is None else \
        f"{r['method']}@{'rel' if r['damping_kind'] == 'relative' else 'abs'}:{r['damping']:g}"  # noqa: E731
    return {label(r): r["n"] for r in rows}


def _top_json(lake, capsys, *args: str) -> list[dict]:
    assert main(["top", *args, "--lake", str(lake), "--format", "json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_top_defaults_to_one_group_and_says_which(lake, capsys):
    groups = _groups(lake, "q-eve")
    assert main(["top", "q-eve", "--k", "3", "--lake", str(lake)]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.startswith("== ")]
    assert headings == [f"== ms-if@rel:0.1: top 3 of {groups['ms-if@rel:0.1']} scored candidates =="]
    assert "showing ms-if@rel:0.1" in out and "--all" in out and "--damping" in out
    for other in groups.keys() - {"ms-if@rel:0.1"}:
        assert other in out  # the note lists what else was scored
    assert out.rstrip().endswith("(3 rows)")
    header = out.splitlines()[out.splitlines().index(headings[0]) + 1].split()
    assert header[:4] == ["rank", "share", "percentile", "score"]


def test_top_all_shows_k_rows_per_group_each_labelled(lake, capsys):
    groups = _groups(lake, "q-fay")
    assert len(groups) == 2 * len(DAMPINGS) + 3  # ms-if and ss-if per damping; gdp, repsim, bm25
    rows = _top_json(lake, capsys, "q-fay", "--all", "--k", "4")
    by_label = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    assert set(by_label) == set(groups)
    for label, group in by_label.items():
        assert [r["rank"] for r in group] == [1, 2, 3, 4], label
        assert all(r["n_scored"] == groups[label] for r in group)
        assert group[0]["percentile"] == 1.0
    assert main(["top", "q-fay", "--all", "--k", "4", "--lake", str(lake)]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.startswith("== ")]
    assert {h.removeprefix("== ").rsplit(": top ", 1)[0] for h in headings} == set(groups)
    assert len(headings) == len(groups) and out.count("(4 rows)") == len(groups)


def test_top_all_with_method_shows_every_damping_of_it(lake, capsys):
    rows = _top_json(lake, capsys, "q-eve", "--all", "--method", "ss-if", "--k", "2")
    assert {r["label"] for r in rows} == {"ss-if@rel:0.1", "ss-if@abs:0.001", "ss-if@abs:0.1"}
    assert len(rows) == 2 * len(DAMPINGS)


@pytest.mark.parametrize("damping", ["abs:0.001", "abs:1e-3", "absolute:0.001"])
def test_top_damping_takes_labels(lake, capsys, damping):
    rows = _top_json(lake, capsys, "q-eve", "--method", "ss-if", "--damping", damping, "--k", "5")
    assert len(rows) == 5
    assert {(r["label"], r["method"], r["damping_kind"], r["damping"]) for r in rows} == \
        {("ss-if@abs:0.001", "ss-if", "absolute", 0.001)}


def test_relative_and_absolute_dampings_of_one_value_are_kept_apart(lake, capsys):
    rel = _top_json(lake, capsys, "q-eve", "--damping", "rel:0.1", "--k", "3")
    ab = _top_json(lake, capsys, "q-eve", "--damping", "abs:0.1", "--k", "3")
    assert {r["label"] for r in rel} == {"ms-if@rel:0.1"} and {r["label"] for r in ab} == {"ms-if@abs:0.1"}
    assert len(rel) == len(ab) == 3


def test_bare_number_damping_is_ambiguous_and_lists_the_dampings(lake, capsys):
    assert main(["top", "q-eve", "--damping", "0.1", "--lake", str(lake)]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "rel:0.1" in err and "abs:0.1" in err
    assert "abs:0.001" in err  # the dampings present in the lake
    assert main(["top", "q-eve", "--damping", "tiny", "--lake", str(lake)]) == 2
    err = capsys.readouterr().err
    assert "'tiny'" in err and "rel:0.1" in err and "abs:0.001" in err


def test_damping_not_scored_lists_those_scored(lake, capsys):
    assert main(["top", "q-eve", "--damping", "abs:0.5", "--lake", str(lake)]) == 1
    err = capsys.readouterr().err
    assert "abs:0.5" in err and "abs:0.001" in err and "rel:0.1" in err
    assert main(["top", "q-eve", "--method", "gdp", "--damping", "rel:0.1", "--lake", str(lake)]) == 1
    assert "drop --damping" in capsys.readouterr().err


def test_unknown_query_is_no_such_query(lake, capsys):
    assert main(["top", "q-nobody", "--lake", str(lake)]) == 1
    err = capsys.readouterr().err
    assert "no such query 'q-nobody'" in err and "has no scores" not in err
    assert f"{len(QUERY_IDS)} queries in the lake" in err and "q-eve" in err and "msif queries" in err


def test_query_without_scores_says_what_to_materialize(lake, tmp_path, capsys):
    # a lake whose queries are materialized but whose influence_scores are not yet
    shutil.copytree(lake / "queries", tmp_path / "lake" / "queries")
    assert main(["top", "q-eve", "--lake", str(tmp_path / "lake")]) == 1
    err = capsys.readouterr().err
    assert "q-eve" in err and "exists but has no scores yet" in err and "influence_scores" in err
    assert "no such query" not in err


def test_unknown_model_lists_the_models(lake, capsys):
    assert main(["top", "q-eve", "--model", "nope", "--lake", str(lake)]) == 1
    err = capsys.readouterr().err
    with Catalog.open(lake) as catalog:
        ft = catalog.query("SELECT DISTINCT ft_model FROM influence").column("ft_model").to_pylist()
    assert "--model nope" in err and all(m in err for m in ft)


def test_queries_lists_every_query_with_scored_counts(lake, capsys):
    assert main(["queries", "--lake", str(lake), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["query_id"] for r in rows] == QUERY_IDS
    by_id = {r["query_id"]: r for r in rows}
    assert by_id["q-eve"]["completion"] == " Paris" and by_id["q-eve"]["completion_source"] == "given"
    assert by_id["q-gus"]["completion_source"] == "generated" and by_id["q-gus"]["completion"]
    with Catalog.open(lake) as catalog:
        scored = {r["query_id"]: r["n"] for r in catalog.query(
            "SELECT query_id, count(DISTINCT (shard, chunk_id)) AS n FROM influence GROUP BY query_id").to_pylist()}
    for qid in QUERY_IDS:
        assert by_id[qid]["n_scored"] == scored[qid] > 0
        assert by_id[qid]["n_candidates"] >= by_id[qid]["n_scored"]
        assert by_id[qid]["n_score_groups"] == len(_groups(lake, qid))
    assert main(["queries", "--lake", str(lake)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["query_id", "prompt", "completion"] and lines[-1] == "(3 rows)"


def test_normalized_view_shares_and_percentiles(lake):
    with Catalog.open(lake) as catalog:
        rows = catalog.query("SELECT query_id, method, damping_kind, damping, rank, score, share, percentile, "
                             "n_scored FROM influence_normalized ORDER BY ALL").to_pylist()
        raw = catalog.query("SELECT count(*) AS n FROM influence").column("n")[0].as_py()
    assert len(rows) == raw  # one normalized row per raw score; raw scores are kept
    groups = defaultdict(list)
    for r in rows:
        groups[(r["query_id"], r["method"], r["damping_kind"], r["damping"])].append(r)
    for key, group in groups.items():
        group.sort(key=lambda r: r["rank"])
        total = sum(abs(r["score"]) for r in group)
        assert sum(abs(r["share"]) for r in group) == pytest.approx(1.0), key
        for r in group:
            assert r["share"] == pytest.approx(r["score"] / total) and r["n_scored"] == len(group)
        assert group[0]["percentile"] == 1.0 and group[-1]["percentile"] == 0.0
        percentiles = [r["percentile"] for r in group]
        assert percentiles == sorted(percentiles, reverse=True) and len(set(percentiles)) == len(group)
        shares = [r["share"] for r in group]
        assert shares == sorted(shares, reverse=True)


def test_top_shares_match_the_normalized_view(lake, capsys):
    rows = _top_json(lake, capsys, "q-gus", "--method", "gdp", "--k", "3")
    with Catalog.open(lake) as catalog:
        want = catalog.query("SELECT rank, share, percentile, score FROM influence_normalized "
                             "WHERE query_id = 'q-gus' AND method = 'gdp' AND rank <= 3 ORDER BY rank").to_pylist()
    assert [{k: r[k] for k in ("rank", "share", "percentile", "score")} for r in rows] == want
    assert {r["label"] for r in rows} == {"gdp"}


def test_top_rejects_a_non_positive_k(lake, capsys):
    with pytest.raises(SystemExit):
        main(["top", "q-eve", "--k", "0", "--lake", str(lake)])
    assert ">= 1" in capsys.readouterr().err
