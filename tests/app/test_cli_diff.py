"""Attribution diff across fine-tunes (issue 14, item 4) on a real lake: one pre-trained model,
materialized with fine-tune A, then (as `msif materialize` does after msif.toml's
finetuned_model changes) with fine-tune B while the corpus gained a shard. The lake keeps A's
scores beside B's (scores/model=<ft hash>/...), so the views attribution_diff and
attribution_diff_summary compare them; they are checked against a pandas computation from the
raw score partitions, and `msif diff` prints the same numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pytest

from msif_assets.app.cli import main
from msif_assets.app.diff import AmbiguousFineTuneError, FineTune, resolve_fine_tune
from msif_assets.app.lineage import bring_up_to_date
from msif_assets.app.report import ReadingError
from msif_assets.config import MsifConfig
from msif_assets.defs.build import build_definitions
from msif_assets.lake import tables
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.layout import LakeLayout
from msif_assets.pipeline.models import ModelIds

from ..defs.byo_world import COMPUTE, make_world, perturb, shard_docs, write_jsonl

GROUP = ["pt_model", "query_id", "method", "damping_kind", "damping"]
CHUNK = ["shard", "chunk_id"]


def _materialize(root: Path, inputs: dict[str, str], instance: dg.DagsterInstance) -> None:
    config = MsifConfig(lake_root=str(root / "lake"), inputs=inputs,
                        compute={**COMPUTE, "all_chunks_below": 100, "factor_shards": ["shard-0", "shard-1"]})
    bring_up_to_date(config, build_definitions(config), instance)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    inputs = make_world(root, n_shards=2)
    instance = dg.DagsterInstance.ephemeral()
    _materialize(root, inputs, instance)  # fine-tune A on shards 0 and 1
    perturb(Path(inputs["pretrained_model"]), root / "ft-b", seed=7)  # seed 7: q-gus gets a non-empty answer
    write_jsonl(Path(inputs["inbox"]) / "shard-2.jsonl", shard_docs(2))
    _materialize(root, {**inputs, "finetuned_model": str(root / "ft-b")}, instance)  # B, and a new shard
    a = ModelIds.of(inputs["pretrained_model"], inputs["finetuned_model"])
    b = ModelIds.of(inputs["pretrained_model"], root / "ft-b")
    return {"root": root, "lake": root / "lake", "a": a.ft, "b": b.ft, "pt": a.pt, "inputs": inputs}


def _raw_scores(lake: Path) -> pd.DataFrame:
    """Every score row, read partition by partition with the lake's own reader."""
    layout = LakeLayout(lake)
    parts = [tables.read_scores(layout, model.name.removeprefix("model="), shard.name.removeprefix("shard="))
             for model in sorted(layout.scores_dir.iterdir()) for shard in sorted(model.iterdir())]
    frame = pd.concat([p.to_pandas() for p in parts], ignore_index=True)
    frame[["damping_kind", "pt_model"]] = frame[["damping_kind", "pt_model"]].fillna("-")
    frame["damping"] = frame["damping"].fillna(-1.0)
    return frame


def _expected(raw: pd.DataFrame, ft_a: str, ft_b: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-chunk rows, per-group summary) of A -> B, computed with pandas from the raw scores."""
    ranked = raw.sort_values(["score", "shard", "chunk_id"], ascending=[False, True, True]).copy()
    ranked["rank"] = ranked.groupby(["ft_model", *GROUP]).cumcount() + 1
    cols = [*GROUP, *CHUNK, "rank", "score"]
    a = ranked[ranked.ft_model == ft_a][cols]
    b = ranked[ranked.ft_model == ft_b][cols]
    groups = a[GROUP].drop_duplicates().merge(b[GROUP].drop_duplicates())
    a, b = a.merge(groups), b.merge(groups)
    rows = a.merge(b, on=[*GROUP, *CHUNK], how="outer", suffixes=("_a", "_b"))
    rows["rank_change"] = rows.rank_a - rows.rank_b
    summary = []
    for key, g in rows.groupby(GROUP):
        both = g.dropna(subset=["rank_a", "rank_b"])
        rho = both.score_a.corr(both.score_b, method="spearman") if len(both) >= 2 else float("nan")
        summary.append({**dict(zip(GROUP, key)), "n_a": int(g.rank_a.notna().sum()), "n_b": int(g.rank_b.notna().sum()),
                        "n_common": len(both), "n_only_a": int(g.rank_b.isna().sum()),
                        "n_only_b": int(g.rank_a.isna().sum()), "spearman": rho,
                        "n_rose": int((both.rank_change > 0).sum()), "n_fell": int((both.rank_change < 0).sum())})
    return rows, pd.DataFrame(summary)


def _view(catalog: Catalog, view: str, ft_a: str, ft_b: str) -> pd.DataFrame:
    frame = catalog.query(f"SELECT * FROM {view} WHERE ft_a = $a AND ft_b = $b", {"a": ft_a, "b": ft_b}).to_pandas()
    frame[["damping_kind", "pt_model"]] = frame[["damping_kind", "pt_model"]].fillna("-")
    frame["damping"] = frame["damping"].fillna(-1.0)
    return frame


def test_second_fine_tune_keeps_the_first_ones_scores(world):
    with Catalog.open(world["lake"]) as catalog:
        rows = catalog.query("SELECT ft_model, pt_model, list(DISTINCT shard ORDER BY shard) AS shards, "
                             "count(DISTINCT query_id) AS n_queries FROM influence GROUP BY ALL ORDER BY ft_model").to_pylist()
    assert world["a"] != world["b"]
    assert {r["ft_model"]: r["shards"] for r in rows} == {world["a"]: ["shard-0", "shard-1"],
                                                         world["b"]: ["shard-0", "shard-1", "shard-2"]}
    assert {r["pt_model"] for r in rows} == {world["pt"]} and {r["n_queries"] for r in rows} == {3}


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_views_match_pandas_on_the_raw_scores(world, order):
    ft_a, ft_b = (world["a"], world["b"]) if order == "ab" else (world["b"], world["a"])
    want_rows, want_summary = _expected(_raw_scores(world["lake"]), ft_a, ft_b)
    with Catalog.open(world["lake"]) as catalog:
        got_rows = _view(catalog, "attribution_diff", ft_a, ft_b)
        got_summary = _view(catalog, "attribution_diff_summary", ft_a, ft_b)
    assert len(want_rows) == len(got_rows) > 0
    key = [*GROUP, *CHUNK]
    merged = want_rows.merge(got_rows, on=key, suffixes=("", "_view"), validate="one_to_one")
    assert len(merged) == len(want_rows)
    for col in ("rank_a", "rank_b", "rank_change", "score_a", "score_b"):
        pd.testing.assert_series_equal(merged[col].astype(float), merged[f"{col}_view"].astype(float),
                                       check_names=False, obj=col)
    presence = merged.rank_a.notna().map({True: "a", False: ""}) + merged.rank_b.notna().map({True: "b", False: ""})
    assert (presence.map({"ab": "both", "a": "only_a", "b": "only_b"}) == merged.presence).all()
    # shard-2 came with fine-tune B: its chunks are scored under B only
    only_b = set(merged[merged.presence == ("only_b" if order == "ab" else "only_a")].shard)
    assert only_b == {"shard-2"} and (merged.presence == "both").sum() > 0
    summary = want_summary.merge(got_summary, on=GROUP, suffixes=("", "_view"), validate="one_to_one")
    assert len(summary) == len(want_summary) == len(got_summary) == 3 * (2 * 2 + 3)  # queries x groups
    for col in ("n_a", "n_b", "n_common", "n_only_a", "n_only_b", "n_rose", "n_fell"):
        assert (summary[col] == summary[f"{col}_view"]).all(), col
    defined = summary.spearman.notna()
    assert (defined == summary.spearman_view.notna()).all()
    assert summary[defined].spearman.tolist() == pytest.approx(summary[defined].spearman_view.tolist(), abs=1e-9)
    assert defined.sum() >= 3 * 2 * 2  # MS-IF and SS-IF: real, distinct rankings under both models


def test_diff_prints_correlation_and_movers_per_group(world, capsys):
    rows, summary = _expected(_raw_scores(world["lake"]), world["a"], world["b"])
    group = (summary.query_id == "q-eve") & (summary.method == "ms-if") & (summary.damping_kind == "relative")
    expected = summary[group].iloc[0]
    args = ["diff", world["a"][:8], world["b"], "--query", "q-eve", "--k", "3", "--lake", str(world["lake"])]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"A = {world['a']}" in out and f"B = {world['b']}" in out
    assert "showing ms-if@rel:0.1" in out and "q-eve" in out and "generated by" not in out  # a given completion
    heading = re.search(r"^== ms-if@rel:0\.1: spearman (\S+) over (\d+) chunks scored under both "
                        r"\(only under A: (\d+), only under B: (\d+)\) ==$", out, re.MULTILINE)
    assert heading, out
    assert float(heading.group(1)) == pytest.approx(expected.spearman, abs=5e-4)
    assert [int(x) for x in heading.groups()[1:]] == [expected.n_common, expected.n_only_a, expected.n_only_b]
    assert expected.n_only_a == 0 and expected.n_only_b > 0
    assert len([line for line in out.splitlines() if line.startswith("== ")]) == 1  # one group by default
    mine = rows[(rows.query_id == "q-eve") & (rows.method == "ms-if") & (rows.damping_kind == "relative")]
    both = mine.dropna(subset=["rank_change"])
    risers = both[both.rank_change > 0].sort_values(["rank_change", "rank_b"], ascending=[False, True]).head(3)
    fallers = both[both.rank_change < 0].sort_values(["rank_change", "rank_b"]).head(3)
    assert len(risers) and len(fallers)
    for title, want in (("rose under B", risers), ("fell under B", fallers)):
        block = out.split(f"-- {title}: ", 1)[1].split("\n(", 1)[0].splitlines()[3:]
        assert [line.split()[:3] for line in block] == [
            [str(int(r.rank_a)), str(int(r.rank_b)), str(int(r.rank_change))] for r in want.itertuples()], title
    assert "-- scored only under B: " in out and "scored only under A" not in out


def test_diff_json_with_method_and_damping(world, capsys):
    args = ["diff", world["b"], world["a"], "--method", "ss-if", "--damping", "abs:1e-3", "--k", "2",
            "--lake", str(world["lake"]), "--format", "json"]
    assert main(args) == 0, capsys.readouterr().err
    rows = json.loads(capsys.readouterr().out)
    assert {r["label"] for r in rows} == {"ss-if@abs:0.001"} and {r["query_id"] for r in rows} == {"q-eve", "q-fay", "q-gus"}
    assert {(r["ft_a"], r["ft_b"]) for r in rows} == {(world["b"], world["a"])}
    with Catalog.open(world["lake"]) as catalog:
        want = {r["query_id"]: r for r in catalog.query(
            "SELECT * FROM attribution_diff_summary WHERE ft_a = $a AND ft_b = $b AND method = 'ss-if' "
            "AND damping_kind = 'absolute' AND damping = 0.001", {"a": world["b"], "b": world["a"]}).to_pylist()}
    for r in rows:
        assert r["spearman"] == pytest.approx(want[r["query_id"]]["spearman"])
        assert r["movement"] in {"rose", "fell", "only_a", "only_b"}
        if r["movement"] in ("rose", "fell"):
            assert r["rank_change"] == r["rank_a"] - r["rank_b"] and (r["rank_change"] > 0) == (r["movement"] == "rose")
        else:  # in the B -> A order, shard-2 (scored under B only) is 'only_a'
            assert r["movement"] == "only_a" and r["shard"] == "shard-2" and r["rank_b"] is None
    per_movement = {}
    for r in rows:
        per_movement.setdefault((r["query_id"], r["movement"]), []).append(r)
    assert max(len(v) for v in per_movement.values()) == 2  # --k 2


def test_model_directories_name_their_fine_tunes(world, capsys):
    by_dir = ["diff", world["inputs"]["finetuned_model"], str(world["root"] / "ft-b"), "--query", "q-fay"]
    by_hash = ["diff", world["a"], world["b"], "--query", "q-fay"]
    assert main([*by_dir, "--lake", str(world["lake"])]) == 0, capsys.readouterr().err
    out_dir = capsys.readouterr().out
    assert main([*by_hash, "--lake", str(world["lake"])]) == 0
    assert out_dir == capsys.readouterr().out
    # the pre-trained model's directory is a model, but not a fine-tune the lake scored
    assert main(["diff", world["inputs"]["pretrained_model"], world["b"], "--lake", str(world["lake"])]) == 1
    err = capsys.readouterr().err
    assert "has no scores in the lake" in err and world["pt"] in err and world["a"] in err and world["b"] in err


def test_unknown_or_repeated_fine_tune_is_a_clear_error(world, capsys):
    lake = str(world["lake"])
    assert main(["diff", "nope", world["b"], "--lake", lake]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no fine-tuned model 'nope'") and world["a"] in err and world["b"] in err
    assert "pre-trained " + world["pt"] in err
    assert main(["diff", world["a"], world["a"][:5], "--lake", lake]) == 2
    assert "give two different fine-tunes" in capsys.readouterr().err
    assert main(["diff", world["a"], world["b"], "--query", "q-nobody", "--lake", lake]) == 1
    assert "no such query 'q-nobody'" in capsys.readouterr().err
    assert main(["diff", world["a"], world["b"], "--method", "nope", "--lake", lake]) == 1
    assert "methods scored for it" in capsys.readouterr().err
    assert main(["diff", world["a"], world["b"], "--lake", str(world["root"] / "empty")]) == 1
    assert "has no influence scores yet" in capsys.readouterr().err


def test_ambiguous_prefix_lists_the_matches(tmp_path):
    known = [FineTune("abc123", ("pt1",), 2, None), FineTune("abd456", ("pt1",), 2, None)]
    assert resolve_fine_tune("abd", known, tmp_path).ft_model == "abd456"
    with pytest.raises(AmbiguousFineTuneError, match=r"'ab' is a prefix of 2 fine-tuned models \(abc123, abd456\)"):
        resolve_fine_tune("ab", known, tmp_path)
    with pytest.raises(ReadingError, match="no fine-tuned model 'x'.*abc123.*abd456"):
        resolve_fine_tune("x", known, tmp_path)


def test_generated_completion_is_flagged(world, capsys):
    assert main(["diff", world["a"], world["b"], "--query", "q-gus", "--lake", str(world["lake"])]) == 0
    assert "generated by a fine-tuned model" in capsys.readouterr().out


def _hand_lake(root: Path, runs: list[tuple[str, str, str]]) -> Path:
    """A lake written with the real score writer: one (ft_model, pt_model, query_id) per run."""
    from ..lake.lake_data import SHARD_SCORES, queries_table, scores_table

    layout = LakeLayout(root / "lake")
    tables.write_queries(layout, queries_table())
    for ft, pt, query_id in runs:
        table = scores_table("s1", query_id, SHARD_SCORES["s1"])
        table = table.set_column(table.schema.get_field_index("ft_model"), "ft_model",
                                 pa.array([ft] * table.num_rows, pa.string()))
        table = table.set_column(table.schema.get_field_index("pt_model"), "pt_model",
                                 pa.array([pt] * table.num_rows, pa.string()))
        tables.write_scores(layout, ft, "s1", table)
    return layout.root


def test_fine_tunes_without_a_shared_query_or_pre_trained_model(tmp_path, capsys):
    lake = _hand_lake(tmp_path / "q", [("aaa111", "pt1", "q1"), ("bbb222", "pt1", "q2")])
    assert main(["diff", "aaa", "bbb", "--lake", str(lake)]) == 1
    err = capsys.readouterr().err
    assert "no query has scores under both aaa111 and bbb222" in err
    lake = _hand_lake(tmp_path / "pt", [("aaa111", "pt1", "q1"), ("bbb222", "pt2", "q1")])
    assert main(["diff", "aaa", "bbb", "--lake", str(lake)]) == 1
    assert "fine-tunes of different pre-trained models (pt1 vs pt2)" in capsys.readouterr().err
