"""Smoke test of the benchmark's --quick path, in-process, on the tiny workload.

Checks structure (every phase in the JSON) and correctness (our SS-IF scores agree with
kronfluence's when it is installed). Never asserts anything about timings.
"""

from __future__ import annotations

import json

import pytest

from bench.kron import KRONFLUENCE_ERROR
from bench.run_bench import main

OUR_PHASES = {
    "covariance",
    "eigendecomposition",
    "lambda",
    "query gradients + precondition (SS-IF)",
    "pairwise scoring (SS-IF)",
    "ft factors (MS-IF, cov+eig+lambda)",
    "query gradients + precondition (MS-IF)",
    "pairwise scoring (MS-IF)",
}
KRON_PHASES = {"covariance", "eigendecomposition", "lambda", "pairwise scoring (SS-IF)"}
FLOORS = {"floor: fwd+bwd fitting set", "floor: fwd+bwd candidates"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # fp32 products on both sides: the two engines must then agree to round-off.
    argv = ["--quick", "--workload", "tiny", "--out", str(out), "--quiet", "--device", "cpu", "--stats-dtype", "model"]
    if KRONFLUENCE_ERROR is not None:
        argv.append("--no-kronfluence")
    returned = main(argv)
    written = json.loads(out.read_text())
    assert written["phases"] == json.loads(json.dumps(returned["phases"]))
    return written


def test_json_has_every_phase(result):
    phases = {(p["engine"], p["name"]) for p in result["phases"]}
    assert {("msif", name) for name in OUR_PHASES} <= phases
    assert {("floor", name) for name in FLOORS} <= phases
    for p in result["phases"]:
        assert p["seconds"] >= 0 and p["cpu_seconds"] >= 0 and p["peak_mb"] >= 0
        assert p["ratio_to_floor_wall"] >= 0 and p["ratio_to_floor_cpu"] >= 0
    for key in ("machine", "workload", "git", "batch_size", "totals", "targets", "pipeline_refresh", "floor_seconds"):
        assert key in result
    assert result["machine"]["torch"] and result["machine"]["torch_threads"] >= 1
    assert result["workload"]["name"] == "tiny"
    assert result["stats_dtype"] == "model"
    assert result["pipeline_refresh"]["status"].startswith("skipped")
    assert set(result["targets"]) >= {"scoring_ss_if_vs_candidate_floor", "covariance_plus_lambda_vs_fit_floor",
                                      "end_to_end_speedup_vs_kronfluence", "agreement_with_kronfluence"}


@pytest.mark.skipif(KRONFLUENCE_ERROR is not None, reason=f"kronfluence not installed: {KRONFLUENCE_ERROR}")
def test_scores_agree_with_kronfluence(result):
    phases = {(p["engine"], p["name"]) for p in result["phases"]}
    assert {("kronfluence", name) for name in KRON_PHASES} <= phases
    agreement = result["agreement"]
    # Same model, batches, sampled labels and damping: equal up to float32 round-off.
    assert agreement["pearson"] > 0.999
    assert agreement["spearman"] > 0.99
    assert agreement["relative_l2_difference"] < 1e-3
    assert result["targets"]["agreement_with_kronfluence"]["met_wall"] is True


def test_pipeline_refresh_touches_only_what_changed(tmp_path):
    """The refresh phases run real Dagster materializations: a new shard reruns only that
    shard's partitions (plus the unpartitioned query-level assets downstream of nothing new),
    and a new fine-tuned model never reruns embeddings or pre-trained factors."""
    import torch

    from bench.measure import Meter
    from bench.pipeline import format_pipeline_table, pipeline_refresh_phases

    full, new_shard, new_ft = pipeline_refresh_phases(Meter(torch.device("cpu")), shards=2, root=tmp_path)
    full_keys = set(full.extra["executed"])
    assert "doc_embeddings[shard-0]" in full_keys and "pt_factors" in full_keys
    shard_partitioned = [e for e in new_shard.extra["executed"] if "[" in e]
    assert shard_partitioned and all(e.endswith("[shard-1]") for e in shard_partitioned)
    assert not any(e.startswith(("doc_", "corpus_", "pt_")) for e in new_ft.extra["executed"])
    assert "ft_factors" in new_ft.extra["executed"]
    for phase in (new_shard, new_ft):
        assert 0 < phase.extra["asset_partitions"] < full.extra["asset_partitions"]
        assert phase.extra["fraction_of_full"] == phase.seconds / full.seconds
    table = format_pipeline_table([p.to_dict() for p in (full, new_shard, new_ft)])
    assert "refresh: new fine-tuned model" in table
