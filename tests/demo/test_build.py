from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from msif_assets.demo.build import STEPS, build_default_world, step_hashes
from msif_assets.demo.train import TrainConfig
from msif_assets.demo.world import WorldConfig
from msif_assets.demo.world_io import load_world

from .tiny import TINY_TRAIN, TINY_WORLD


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    world_cfg, train_cfg = WorldConfig(**TINY_WORLD), TrainConfig(**TINY_TRAIN)
    return out, world_cfg, train_cfg, build_default_world(out, world_cfg, train_cfg)


def test_first_build_runs_every_step_and_reports(built):
    out, world_cfg, _, result = built
    assert result["ran"] == list(STEPS) and result["skipped"] == []
    paths = {k: Path(v) for k, v in result["paths"].items()}
    assert load_world(paths["world_dir"]).config == world_cfg
    for key in ("pretrained_dir", "finetuned_dir"):
        assert (paths[key] / "model.safetensors").is_file()
    m = result["metrics"]
    for key in ("heldout_qa_accuracy", "finetune_qa_accuracy", "pretrained_heldout_qa_accuracy",
                "majority_baseline_heldout_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert m["pretrain_final_loss"] > 0 and 0 < m["relative_param_distance"] < 1
    assert set(result["timings"]) == {f"{s}_s" for s in STEPS} | {"total_s"}
    manifest = json.loads((out / "build.json").read_text())
    assert {s: manifest["steps"][s]["hash"] for s in STEPS} == result["hashes"]


def test_rerun_skips_every_step(built):
    out, world_cfg, train_cfg, first = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".build.lock"}
    again = build_default_world(out, world_cfg, train_cfg)
    assert again["ran"] == [] and again["skipped"] == list(STEPS)
    assert again["metrics"] == first["metrics"]
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".build.lock"}
    assert after == before



def test_a_cached_build_says_so_in_one_line(built, caplog):
    out, world_cfg, train_cfg, _ = built
    with caplog.at_level(logging.INFO, logger="msif_assets.demo.build"):
        build_default_world(out, world_cfg, train_cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "msif_assets.demo.build"]
    assert lines == [f"build: {', '.join(STEPS)} up to date in {out.resolve()}, reused"]

def test_finetune_change_reruns_only_finetune_and_evaluation(built):
    out, world_cfg, train_cfg, _ = built
    pt_weights = out / "models" / "pretrained" / "model.safetensors"
    stamp = pt_weights.stat().st_mtime_ns
    changed = build_default_world(out, world_cfg, replace(train_cfg, finetune_lr=2e-3))
    assert changed["ran"] == ["finetune", "evaluate"]
    assert pt_weights.stat().st_mtime_ns == stamp
    # A missing output is rebuilt even when the manifest says the step is current, and so is
    # everything downstream of it.
    (out / "models" / "finetuned" / "model.safetensors").unlink()
    rebuilt = build_default_world(out, world_cfg, replace(train_cfg, finetune_lr=2e-3))
    assert rebuilt["ran"] == ["finetune", "evaluate"] and rebuilt["skipped"] == ["world", "tokenizer", "pretrain"]


def test_step_hashes_chain_and_ignore_device():
    w, t = WorldConfig(**TINY_WORLD), TrainConfig(**TINY_TRAIN)
    base = step_hashes(w, t)
    assert step_hashes(w, replace(t, device="cuda", num_threads=7)) == base
    reseeded = step_hashes(replace(w, seed=99), t)
    assert all(reseeded[s] != base[s] for s in STEPS)
    wider = step_hashes(w, replace(t, hidden_size=64))
    assert wider["world"] == base["world"] and wider["tokenizer"] == base["tokenizer"]
    assert all(wider[s] != base[s] for s in ("pretrain", "finetune", "evaluate"))


def test_cli_builds_the_tiny_size_and_prints_json(tmp_path, capsys):
    from msif_assets.demo.build import main

    assert main(["--out", str(tmp_path), "--size", "tiny", "--log-level", "WARNING"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ran"] == list(STEPS)
    assert (tmp_path / "models" / "finetuned" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--size", "huge"])
