"""The whole lineage on a bfloat16 pt/ft pair (how Pythia and Llama are published): it runs in
the float32 compute dtype, its scores are finite and equal those of the same weights saved in
float32, and its rows carry the content ids of the bfloat16 directories."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from msif_assets.lake.models import fingerprint_model_dir, load_causal_lm

from .byo_world import assert_same_scores, materialize_scores, make_world, save_model



def _rewrite(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """``src`` saved again with its weights in ``dtype`` (bfloat16: rounded; float32: exact upcast)."""
    if dtype == torch.float32:
        loaded = load_causal_lm(src, dtype=torch.float32, device="cpu")
        save_model(loaded.model, loaded.tokenizer, dst)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        model.save_pretrained(dst, safe_serialization=True)
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, dst / f.name)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16" if dtype == torch.bfloat16 else "F32"}


@pytest.mark.slow
def test_bf16_world_scores_equal_its_float32_upcast(tmp_path):
    inputs = make_world(tmp_path / "src")
    worlds = {}
    for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        root = tmp_path / name
        models = {}
        for key in ("pretrained_model", "finetuned_model"):
            # the float32 world is the exact upcast of the bfloat16 one
            src = Path(inputs[key]) if name == "bf16" else Path(worlds["bf16"][0][key])
            _rewrite(src, root / key, dtype)
            models[key] = str(root / key)
        worlds[name] = ({**inputs, **models}, root)

    half = materialize_scores(worlds["bf16"][1], worlds["bf16"][0])
    upcast = materialize_scores(worlds["f32"][1], worlds["f32"][0])
    ids = {k: fingerprint_model_dir(worlds["bf16"][0][k])[:16] for k in ("pretrained_model", "finetuned_model")}
    assert set(half.column("ft_model").to_pylist()) == {ids["finetuned_model"]}
    assert set(half.column("pt_model").to_pylist()) - {None} == {ids["pretrained_model"]}

    assert_same_scores(half, upcast, "bf16 world vs float32 upcast")
