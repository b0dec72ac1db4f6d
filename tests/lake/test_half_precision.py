"""Half-precision checkpoints (bfloat16 / float16, as Pythia and Llama are published): the lake
loaders read them as stored and upcast exactly to the compute dtype; the content fingerprint
and the non-finite check read them too; the tokenizer and config paths do not care."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForSequenceClassification, LlamaConfig

from msif_assets.demo.tokenizer import build_tokenizer
from msif_assets.lake.models import (
    ModelDirError, check_finite_weights, fingerprint_model_dir, load_causal_lm, load_model_for_finetune, load_tokenizer,
    validate_model_dir,
)
from msif_assets.pipeline.models import ModelIds, check_pair, load_pair
from msif_assets.pipeline.settings import ComputeSettings

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_CODE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["Ada was born in Paris .", "Bob likes the sea ."], model_max_length=32)


def _config(arch: str, tokenizer):
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             rotary_pct=0.5, **common)
    return LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=24, **common)


def _save_half(arch: str, dtype: torch.dtype, tokenizer, path, **save_kwargs) -> dict[str, torch.Tensor]:
    """A random model saved with save_pretrained in ``dtype``; returns its (half) state dict."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, tokenizer))
    with torch.no_grad():
        for p in model.parameters():  # wider than the init scale: many values not representable in half
            p.normal_(0, 0.3)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _stored_dtypes(path) -> set[str]:
    out = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            out |= {fh.get_slice(k).get_dtype() for k in fh.keys()}
    return out


def _assert_exact_upcast(model, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert {p.dtype for p in model.parameters()} == {dtype}
    state = model.state_dict()
    assert stored.keys() <= state.keys()
    for name, value in stored.items():
        assert state[name].dtype == dtype, name
        assert torch.equal(state[name], value.to(dtype)), name  # half → float32/64 is exact


@pytest.mark.parametrize("compute", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_half_checkpoint_loads_upcast_exactly(tmp_path, tokenizer, arch, half, compute):
    path = tmp_path / f"{arch}-{half}"
    stored = _save_half(arch, HALF[half], tokenizer, path)
    assert _stored_dtypes(path) == {SAFETENSORS_CODE[HALF[half]]}
    assert json.loads((path / "config.json").read_text())["dtype"] == half  # as published checkpoints say

    loaded = load_causal_lm(path, dtype=compute, device="cpu")
    _assert_exact_upcast(loaded.model, stored, compute)
    assert loaded.model.config.dtype == compute
    ids = torch.tensor([loaded.tokenizer("Ada was born in Paris .")["input_ids"]])
    logits = loaded.model(input_ids=ids).logits
    assert logits.dtype == compute and bool(torch.isfinite(logits).all())
    # the default compute dtype is float32, never the checkpoint's half dtype
    assert {p.dtype for p in load_causal_lm(path, device="cpu").model.parameters()} == {torch.float32}


def test_legacy_torch_dtype_key_and_sharded_bf16(tmp_path, tokenizer):
    """Older published configs (Pythia) say ``torch_dtype`` instead of ``dtype``; big checkpoints
    come sharded with an index."""
    path = tmp_path / "legacy"
    stored = _save_half("gpt_neox", torch.bfloat16, tokenizer, path, max_shard_size="4KB")
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    config = json.loads((path / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")
    (path / "config.json").write_text(json.dumps(config))
    _assert_exact_upcast(load_causal_lm(path, dtype=torch.float32, device="cpu").model, stored, torch.float32)


def test_half_sequence_classifier_loads_for_finetune(tmp_path, tokenizer):
    config = _config("gpt_neox", tokenizer)
    config.num_labels = 3
    torch.manual_seed(0)
    model = GPTNeoXForSequenceClassification(config).to(torch.float16)
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    loaded = load_model_for_finetune(tmp_path / "clf", dtype=torch.float32, device="cpu")
    assert loaded.task == "sequence_classification"
    _assert_exact_upcast(loaded.model, model.state_dict(), torch.float32)


def test_pipeline_loaders_use_the_compute_dtype(tmp_path, tokenizer):
    pt, ft = tmp_path / "pt", tmp_path / "ft"
    stored_pt = _save_half("gpt_neox", torch.bfloat16, tokenizer, pt)
    stored_ft = _save_half("gpt_neox", torch.float16, tokenizer, ft)
    for dtype in ("float32", "float64"):
        settings = ComputeSettings(device="cpu", dtype=dtype)
        assert [s.name for s in check_pair(pt, ft, settings)]
        pair = load_pair(pt, ft, ModelIds.of(pt, ft), settings)
        _assert_exact_upcast(pair.pt.model, stored_pt, settings.torch_dtype)
        _assert_exact_upcast(pair.ft.model, stored_ft, settings.torch_dtype)
        assert pair.specs


def test_fingerprint_and_tokenizer_of_half_checkpoints(tmp_path, tokenizer):
    half = tmp_path / "half"
    _save_half("gpt_neox", torch.bfloat16, tokenizer, half)
    upcast = tmp_path / "upcast"
    load_causal_lm(half, dtype=torch.float32, device="cpu").model.save_pretrained(upcast)
    tokenizer.save_pretrained(upcast)
    assert _stored_dtypes(upcast) == {"F32"}
    fp = fingerprint_model_dir(half)
    assert len(fp) == 64 and fingerprint_model_dir(half) == fp
    # same values, different bytes: a different model directory, so a different content id
    assert fingerprint_model_dir(upcast) != fp
    tok, window = load_tokenizer(half)
    assert window == 32 and tok("Ada was born in Paris .")["input_ids"] == tokenizer("Ada was born in Paris .")["input_ids"]


@pytest.mark.parametrize("half, bad, label", [("bfloat16", float("nan"), "NaN"), ("float16", float("inf"), "+Inf"),
                                              ("float16", float("-inf"), "-Inf")])
def test_nonfinite_half_weights_are_refused(tmp_path, tokenizer, half, bad, label):
    path = tmp_path / half
    _save_half("gpt_neox", HALF[half], tokenizer, path)
    check_finite_weights(validate_model_dir(path))  # finite: passes
    weights = load_file(path / "model.safetensors")
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    assert weights[name].dtype == HALF[half]
    weights[name][2, 5] = bad
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelDirError, match=re.escape(f"{name} (1 {label}) first at [2, 5]")):
        load_causal_lm(path, device="cpu")
