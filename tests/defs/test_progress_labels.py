"""Progress lines logged inside an asset step name the asset and partition they work for."""

import logging

import dagster as dg

from msif_assets.config import MsifConfig
from msif_assets.defs.build import build_definitions
from msif_assets.defs.progress import running_asset_label
from msif_assets.engine import traversal
from msif_assets.engine.traversal import Progress


def test_progress_inside_a_partitioned_asset_names_asset_and_shard(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(traversal, "_label_source", None)
    build_definitions(MsifConfig(lake_root=str(tmp_path / "lake"), demo_dir=str(tmp_path / "world")))  # installs the source
    assert traversal._label_source is running_asset_label

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["shard-03"]))
    def pt_covariance() -> None:
        Progress("covariance: batch", 64, every=0.0).update(22)

    @dg.asset
    def pt_eigenbasis() -> None:
        Progress("eigendecomposition: module", 8, every=0.0).update(3)

    with caplog.at_level(logging.INFO, logger="msif_assets.engine.traversal"):
        instance = dg.DagsterInstance.ephemeral()
        assert dg.materialize([pt_covariance], partition_key="shard-03", instance=instance).success
        assert dg.materialize([pt_eigenbasis], instance=instance).success
    lines = [r.getMessage().split(",")[0] for r in caplog.records if r.name == "msif_assets.engine.traversal"]
    assert lines == ["pt_covariance [shard-03]: covariance: batch 22/64", "pt_eigenbasis: eigendecomposition: module 3/8"]
    assert running_asset_label() == ""  # outside a step
