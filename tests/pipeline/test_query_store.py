"""One score key's query blocks are published together by a marker written last: a write killed
midway leaves the key unpublished (a clear error), never a mix of old and new blocks."""

from __future__ import annotations

import pytest
import torch

from msif_assets.engine import Damping
from msif_assets.lake.factor_store import MissingArtifactError
from msif_assets.lake.layout import LakeLayout
from msif_assets.pipeline import query_store
from msif_assets.pipeline.models import ModelIds
from msif_assets.pipeline.settings import ScoreKey

IDS = ModelIds(pt="a" * 16, ft="b" * 16)
KEY = ScoreKey("ms-if", Damping.parse("abs:0.001"))


def _write(layout: LakeLayout, blocks: list[list[str]], fill: float) -> None:
    for block, qids in enumerate(blocks):
        query_store.write_block(layout, IDS, KEY, block, {"m": torch.full((len(qids), 2, 3), fill)}, qids)


def test_blocks_are_read_only_once_published_and_a_killed_rewrite_unpublishes(tmp_path):
    layout = LakeLayout(tmp_path / "lake")
    with pytest.raises(MissingArtifactError, match="materialize query_gradients"):
        query_store.block_count(layout, IDS, KEY)  # never written
    query_store.unpublish(layout, IDS, KEY)
    _write(layout, [["q1", "q2"], ["q3"]], 1.0)
    query_store.publish(layout, IDS, KEY, 2, 3)
    assert query_store.block_count(layout, IDS, KEY) == 2
    assert query_store.block_query_ids(layout, IDS, KEY, 1) == ["q3"]

    query_store.unpublish(layout, IDS, KEY)  # a rewrite with one block of three queries, killed after its block
    _write(layout, [["q1", "q2", "q3"]], 2.0)
    with pytest.raises(MissingArtifactError, match="interrupted"):
        query_store.block_count(layout, IDS, KEY)

    query_store.publish(layout, IDS, KEY, 1, 3)  # the rerun completes: the stale second block is gone
    assert query_store.block_count(layout, IDS, KEY) == 1
    assert sorted(p.name for p in layout.query_gradients_dir(IDS.pt, IDS.ft, KEY.method, KEY.tag).iterdir()) == [
        "block=00000.safetensors", "blocks.json"]
    assert torch.equal(query_store.read_block(layout, IDS, KEY, 0)["m"], torch.full((3, 2, 3), 2.0))
