"""Shared fixtures for storage-layer tests: a small lake written through the real writers."""

from __future__ import annotations

import pytest

from msif_assets.lake.layout import LakeLayout
from msif_assets.lake.tables import write_chunks, write_docs, write_queries, write_scores

from .lake_data import FT, SHARD_SCORES, SHARD_TEXTS, chunks_table, docs_table, queries_table, scores_table


@pytest.fixture
def layout(tmp_path) -> LakeLayout:
    return LakeLayout(tmp_path / "lake")


@pytest.fixture
def small_lake(layout: LakeLayout) -> LakeLayout:
    """Two shards of docs/chunks, one query and MS-IF scores for it."""
    for shard, texts in SHARD_TEXTS.items():
        write_docs(layout, shard, docs_table(shard, texts))
        write_chunks(layout, shard, chunks_table(shard, texts))
        write_scores(layout, FT, shard, scores_table(shard, "q1", SHARD_SCORES[shard]))
    write_queries(layout, queries_table())
    return layout
