"""Loading a model directory refuses NaN/Inf weights, naming the directory, every offending
safetensors file (sharded checkpoints included) and tensor, with counts."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from msif_assets.demo.tokenizer import build_tokenizer
from msif_assets.lake.models import ModelDirError, load_causal_lm, load_model_for_finetune


@pytest.fixture()
def sharded_dir(tmp_path):
    tokenizer = build_tokenizer(["Ada was born in Paris ."], model_max_length=16)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path / "sharded"
    GPT2LMHeadModel(config).save_pretrained(path, max_shard_size="20KB")
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


def _shard_of(path, suffix):
    for f in sorted(path.glob("*.safetensors")):
        names = [k for k in load_file(f) if k.endswith(suffix)]
        if names:
            return f, names[0]
    raise AssertionError(suffix)


def test_nonfinite_weights_name_every_file_and_tensor(sharded_dir):
    load_causal_lm(sharded_dir, device="cpu")  # finite: loads (and the files are remembered as checked)
    wte_file, wte = _shard_of(sharded_dir, "wte.weight")
    fc_file, fc = _shard_of(sharded_dir, "h.1.mlp.c_fc.bias")
    assert wte_file != fc_file
    for f, name, value, index in ((wte_file, wte, float("nan"), (slice(None), 2)), (fc_file, fc, float("inf"), 7)):
        tensors = load_file(f)
        tensors[name][index] = value
        save_file(tensors, f, metadata={"format": "pt"})
    n_rows = load_file(wte_file)[wte].shape[0]
    for load in (load_causal_lm, load_model_for_finetune):
        with pytest.raises(ModelDirError) as err:
            load(sharded_dir, device="cpu")
        message = str(err.value)
        assert f"model directory {sharded_dir.resolve()} has non-finite weights" in message
        assert f"non-finite values in {wte_file.resolve()}: {wte} ({n_rows} NaN) first at [0, 2]" in message, message
        assert f"non-finite values in {fc_file.resolve()}: {fc} (1 +Inf) first at [7]" in message, message
        assert "save_pretrained" in message
