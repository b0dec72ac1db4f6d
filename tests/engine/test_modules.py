"""Module discovery, orientation, scopes, compatibility checks."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

from msif_assets.engine import (
    IncompatibleModelsError, UnsupportedArchitectureError, classification_example, discover_modules,
    shared_modules, sequence_gradients,
)
from msif_assets.engine.modules import weight_matrix

from .reference import ARCHS, build_tiny, tiny_config

EXPECTED = {  # block-relative names, (d_out, d_in incl. bias column)
    "gpt_neox": {"attention.query_key_value": (24, 9), "attention.dense": (8, 9), "mlp.dense_h_to_4h": (16, 9), "mlp.dense_4h_to_h": (8, 17)},
    "gpt2": {"attn.c_attn": (24, 9), "attn.c_proj": (8, 9), "mlp.c_fc": (16, 9), "mlp.c_proj": (8, 17)},
    "llama": {"self_attn.q_proj": (8, 8), "self_attn.k_proj": (4, 8), "self_attn.v_proj": (4, 8), "self_attn.o_proj": (8, 8),
              "mlp.gate_proj": (12, 8), "mlp.up_proj": (12, 8), "mlp.down_proj": (8, 12)},
    "bloom": {"self_attention.query_key_value": (24, 9), "self_attention.dense": (8, 9), "mlp.dense_h_to_4h": (32, 9), "mlp.dense_4h_to_h": (8, 33)},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_discovers_every_block_linear_in_out_in_orientation(arch, tmp_path):
    model = build_tiny(arch, tmp_path)
    specs = discover_modules(model)
    modules = dict(model.named_modules())
    assert len(specs) == 2 * len(EXPECTED[arch])
    for spec in specs:
        suffix = spec.name.split(f".{spec.layer_index}.", 1)[1]
        assert (spec.d_out, spec.d_in) == EXPECTED[arch][suffix]
        w = weight_matrix(modules[spec.name], spec)
        assert w.shape == (spec.d_out, spec.d_in)
        x = torch.randn(3, spec.d_in - int(spec.has_bias), dtype=w.dtype)
        x1 = torch.cat([x, torch.ones(3, 1, dtype=w.dtype)], 1) if spec.has_bias else x
        torch.testing.assert_close(modules[spec.name](x), x1 @ w.T)  # (d_out, d_in) really maps inputs to outputs
    names = " ".join(s.name for s in specs)
    assert "embed" not in names and "lm_head" not in names and "norm" not in names


@pytest.mark.parametrize("arch", ARCHS)
def test_scopes_partition_the_modules(arch, tmp_path):
    model = build_tiny(arch, tmp_path)
    every = {s.name for s in discover_modules(model, "all")}
    mlp = {s.name for s in discover_modules(model, "mlp")}
    attn = {s.name for s in discover_modules(model, "attn")}
    assert mlp and attn and not (mlp & attn) and mlp | attn == every
    with pytest.raises(ValueError, match="scope"):
        discover_modules(model, "embeddings")


def test_unsupported_architecture_names_itself_and_the_supported_ones():
    model = OPTForCausalLM(OPTConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2))
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='opt'.*gpt_neox.*gpt2.*llama.*bloom"):
        discover_modules(model)


def test_compatibility_check_lists_every_mismatch():
    pt = GPTNeoXForCausalLM(tiny_config("gpt_neox"))
    other = tiny_config("gpt_neox")
    other.intermediate_size = 20
    ft = GPTNeoXForCausalLM(other)
    with pytest.raises(IncompatibleModelsError) as err:
        shared_modules(pt, ft)
    message = str(err.value)
    for layer in (0, 1):
        assert f"layers.{layer}.mlp.dense_h_to_4h.d_out" in message
        assert f"layers.{layer}.mlp.dense_4h_to_h.d_in" in message
    with pytest.raises(IncompatibleModelsError, match="model_type"):
        shared_modules(pt, GPT2LMHeadModel(tiny_config("gpt2")))


def test_classification_finetune_tracks_shared_modules_and_measures_label(tmp_path):
    pt = build_tiny("gpt_neox", tmp_path)
    pt.save_pretrained(tmp_path / "pt")
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pt", num_labels=3, dtype=torch.float64).eval()
    specs = shared_modules(pt, cls)
    assert [s.name for s in specs] == [s.name for s in discover_modules(pt)]
    examples = [classification_example([5, 6, 7, 8], 2), classification_example([9, 4, 3], 0)]
    grads = sequence_gradients(cls, specs, examples, batch_size=2)
    modules = dict(cls.named_modules())
    for row, example in enumerate(examples):
        cls.zero_grad()
        logits = cls(input_ids=torch.tensor([example.input_ids])).logits[0]
        torch.log_softmax(logits, -1)[example.label].backward()
        for s in specs:
            w = modules[s.name]
            expected = torch.cat([w.weight.grad, w.bias.grad[:, None]], 1)
            torch.testing.assert_close(grads[s.name][row], expected, rtol=1e-8, atol=1e-12)
