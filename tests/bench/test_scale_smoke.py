"""Smoke test of ``bench/scale.py --quick``: every case runs in its own process through the
pipeline's factor, query and scoring code, and the JSON holds cases, peak memory, slopes and the
projection. Timings are never asserted."""

from __future__ import annotations

import json

import pytest

from bench.kron import KRONFLUENCE_ERROR
from bench.scale import SHAPES, main, projection, tracked_shapes


def test_quick_scale_run_writes_every_case(tmp_path):
    out = tmp_path / "scale.json"
    assert main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cases = result["models"]["tiny"]["cases"]
    assert [c["case"] for c in cases] == ["factors", "queries", "queries", "scoring", "scoring"]
    assert all(c["peak_rss_mb"] > 0 and c["phases"] for c in cases)
    assert cases[0]["factor_file_mb"] > 0 and cases[1]["vector_mb"] > 0
    assert set(result["models"]["tiny"]["slopes"]) == {
        "query_time_vs_queries", "query_peak_rss_vs_queries", "scoring_time_vs_candidates", "scoring_peak_rss_vs_candidates"}
    assert result["eigh"][0]["dim"] == 64


def test_projection_counts_the_pythia_410m_shapes():
    shapes = tracked_shapes(SHAPES["pythia-410m"])
    assert len(shapes) == 24 * 4 and (4096, 1025) in shapes and (1024, 4097) in shapes
    p = projection(SHAPES["pythia-410m"], rank=32, block=8, n_keys=3)
    assert 300 < p["tracked_params_m"] < 305  # 24 × (3·1024² + 1024² + 2·4096·1024) + biases


@pytest.mark.skipif(KRONFLUENCE_ERROR is not None, reason=f"kronfluence not installed: {KRONFLUENCE_ERROR}")
def test_quick_scale_run_measures_kronfluence_beside_msif(tmp_path):
    out = tmp_path / "scale.json"
    assert main(["--quick", "--kronfluence", "--out", str(out)]) == 0
    kron = json.loads(out.read_text())["models"]["tiny"]["cases"][-1]
    assert kron["case"].startswith("kronfluence") and kron["n"] == 8 and kron["peak_rss_mb"] > 0
    assert set(kron["phases"]) == set(kron["phase_peak_mb"]) >= {"covariance", "lambda"}
