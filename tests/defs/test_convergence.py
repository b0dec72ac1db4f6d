"""Pairs of lineage changes in one `msif materialize` converge: after the run the lake holds
exactly what a fresh lake materialized from the same inputs holds, and a second run does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
from safetensors.torch import load_file, save_file

from msif_assets.app.lineage import bring_up_to_date
from msif_assets.config import MsifConfig
from msif_assets.defs.build import build_definitions
from msif_assets.lake.catalog import Catalog

from .byo_world import COMPUTE, make_world, perturb, shard_docs, write_jsonl

SCORE_SQL = ("SELECT query_id, chunk_id, method, damping_kind, damping, score FROM influence "
             "WHERE pt_model = $pt AND ft_model = $ft ORDER BY ALL")


def _config(root: Path, inputs: dict, lake: str, **compute) -> MsifConfig:
    return MsifConfig(lake_root=str(root / lake), inputs=inputs, compute={**COMPUTE, "all_chunks_below": 100, **compute})


class Lake:
    def __init__(self, root: Path, inputs: dict):
        self.root, self.inputs, self.instance = root, inputs, dg.DagsterInstance.ephemeral()
        self.compute: dict = {}

    def materialize(self):
        config = _config(self.root, self.inputs, "lake", **self.compute)
        return bring_up_to_date(config, build_definitions(config), self.instance)

    def scores(self, lake: str = "lake") -> pa.Table:
        from msif_assets.pipeline.models import ModelIds

        ids = ModelIds.of(self.inputs["pretrained_model"], self.inputs["finetuned_model"])
        with Catalog.open(self.root / lake) as catalog:
            return catalog.query(SCORE_SQL, {"pt": ids.pt, "ft": ids.ft})

    def fresh_scores(self, name: str) -> pa.Table:
        config = _config(self.root, self.inputs, name, **self.compute)
        bring_up_to_date(config, build_definitions(config), dg.DagsterInstance.ephemeral())
        return self.scores(name)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("converge")
    lake = Lake(root, make_world(root))
    lake.materialize()
    return lake


def _new_shard(lake: Lake, n: int) -> None:
    write_jsonl(Path(lake.inputs["inbox"]) / f"shard-{n}.jsonl", shard_docs(n))


def _change_pretrained(lake: Lake, factor: float) -> None:
    weights = Path(lake.inputs["pretrained_model"]) / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "dense_h_to_4h.weight" in k)
    tensors[name] = tensors[name] * factor
    save_file(tensors, weights, metadata={"format": "pt"})


def _change_finetuned(lake: Lake, seed: int) -> None:
    perturb(Path(lake.inputs["pretrained_model"]), Path(lake.inputs["finetuned_model"]), seed=seed)


def _new_query(lake: Lake, query_id: str, person: str) -> None:
    path = Path(lake.inputs["queries"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, rows + [{"query_id": query_id, "prompt": f"Where was {person} born ?", "completion": " Lima"}])


def _new_damping(lake: Lake, damping: str) -> None:
    lake.compute = {"dampings": [*COMPUTE["dampings"], damping]}


PAIRS = {
    "pretrained+shard": (lambda k: _change_pretrained(k, 1.01), lambda k: _new_shard(k, 2)),
    "finetuned+shard": (lambda k: _change_finetuned(k, 3), lambda k: _new_shard(k, 3)),
    "pretrained+finetuned": (lambda k: _change_pretrained(k, 0.99), lambda k: _change_finetuned(k, 4)),
    "queries+pretrained": (lambda k: _new_query(k, "q-hal", "Hal"), lambda k: _change_pretrained(k, 1.02)),
    "damping+shard": (lambda k: _new_damping(k, "abs:0.01"), lambda k: _new_shard(k, 4)),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_two_changes_in_one_run_converge_to_a_fresh_lake(lake, pair):
    for change in PAIRS[pair]:
        change(lake)
    lake.materialize()
    got, fresh = lake.scores(), lake.fresh_scores(f"fresh-{pair}")
    assert got.num_rows == fresh.num_rows > 0
    assert got.drop_columns(["score"]).equals(fresh.drop_columns(["score"]))
    for a, b in zip(got.column("score").to_pylist(), fresh.column("score").to_pylist()):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    ran, refreshed, _, _ = lake.materialize()
    assert ran.executed == [] and refreshed.executed == []
