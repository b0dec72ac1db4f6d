"""A PEFT LoRA adapter as the fine-tuned model: the lineage over (pre-trained base + adapter)
scores exactly as over the same model merged and saved as a full directory; the content id
covers both the adapter and the base; pickle adapters and adapters of another base are refused."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, GPTNeoXForCausalLM

from msif_assets.app import runner
from msif_assets.lake.models import ModelDirError, fingerprint_model_dir, load_model_for_finetune

from .byo_world import assert_same_scores, materialize_scores, byo_definitions, make_world, perturb, save_model

# every linear of a GPT-NeoX block: attention (fused qkv, output) and MLP
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def train_lora(pt_dir: Path, data_file: Path, out: Path, seed: int, steps: int = 10) -> GPTNeoXForCausalLM:
    """Train a real LoRA adapter on ``pt_dir`` for a few AdamW steps, save it (safetensors) to
    ``out``, and return the model with the adapter merged in."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(pt_dir)
    model = get_peft_model(GPTNeoXForCausalLM.from_pretrained(pt_dir), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    batch = tokenizer([r["prompt"] + r["completion"] for r in rows], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out)  # safetensors is peft's default
    assert sorted(f.name for f in out.iterdir() if f.suffix in (".json", ".safetensors", ".bin")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    merged = model.merge_and_unload()
    base = GPTNeoXForCausalLM.from_pretrained(pt_dir)
    moved = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert any("attention" in n for n in moved) and any("mlp" in n for n in moved), "the adapter must move weights"
    return merged


@pytest.fixture()
def world(tmp_path):
    inputs = make_world(tmp_path / "src")
    adapter = tmp_path / "adapter"
    merged = train_lora(Path(inputs["pretrained_model"]), Path(inputs["finetune_data"]), adapter, seed=0)
    return inputs, adapter, merged


@pytest.mark.slow
def test_adapter_lineage_scores_equal_the_merged_full_model(world, tmp_path):
    inputs, adapter, merged = world
    merged_dir = tmp_path / "merged"
    save_model(merged, AutoTokenizer.from_pretrained(inputs["pretrained_model"]), merged_dir)

    via_adapter = materialize_scores(tmp_path / "lake-adapter", {**inputs, "finetuned_model": str(adapter)})
    via_full = materialize_scores(tmp_path / "lake-full", {**inputs, "finetuned_model": str(merged_dir)})

    assert_same_scores(via_adapter, via_full, "adapter vs merged full dir")


def test_fingerprint_changes_with_the_adapter_and_with_the_base(world, tmp_path):
    inputs, adapter, _ = world
    pt = Path(inputs["pretrained_model"])
    fp = fingerprint_model_dir(adapter, base=pt)
    assert len(fp) == 64 and fingerprint_model_dir(adapter, base=pt) == fp
    assert fp != fingerprint_model_dir(pt)
    with pytest.raises(ModelDirError, match="PEFT adapter directory.*base"):
        fingerprint_model_dir(adapter)

    train_lora(pt, Path(inputs["finetune_data"]), adapter, seed=1)  # a new adapter over the same base
    fp_new_adapter = fingerprint_model_dir(adapter, base=pt)
    assert fp_new_adapter != fp

    moved = tmp_path / "pt-moved"
    perturb(pt, moved, seed=5, scale=1e-3)  # the base itself is updated in place
    shutil.copy(moved / "model.safetensors", pt / "model.safetensors")
    assert fingerprint_model_dir(adapter, base=pt) not in (fp, fp_new_adapter)


def test_a_pickle_only_adapter_is_refused_naming_the_file(world, tmp_path):
    inputs, adapter, _ = world
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled / "adapter_config.json")
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    for attempt in (lambda: fingerprint_model_dir(pickled, base=inputs["pretrained_model"]),
                    lambda: load_model_for_finetune(pickled, device="cpu", base=inputs["pretrained_model"])):
        with pytest.raises(ModelDirError, match=r"adapter_model\.bin.*safe_serialization=True"):
            attempt()
    defs = byo_definitions(tmp_path / "root", {**inputs, "finetuned_model": str(pickled)})
    with pytest.raises(Exception, match=r"adapter_model\.bin"):
        runner.observe_inputs(defs, dg.DagsterInstance.ephemeral())


def test_an_adapter_of_another_local_base_is_refused(world, tmp_path):
    inputs, adapter, _ = world
    pt = Path(inputs["pretrained_model"])
    other = Path(inputs["finetuned_model"])  # a model directory with other weights
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(pt)
    with pytest.raises(ModelDirError, match=r"base_model_name_or_path.*differs from the configured pretrained_model"):
        fingerprint_model_dir(adapter, base=other)
    with pytest.raises(ModelDirError, match=r"base_model_name_or_path"):
        load_model_for_finetune(adapter, device="cpu", base=other)
    copy = tmp_path / "pt-copy"  # the same base at another path is the same base
    shutil.copytree(pt, copy)
    assert fingerprint_model_dir(adapter, base=copy) == fingerprint_model_dir(adapter, base=pt)


def test_loaded_adapter_is_the_merged_model_with_the_adapter_tokenizer_if_any(world):
    inputs, adapter, merged = world
    pt = inputs["pretrained_model"]
    loaded = load_model_for_finetune(adapter, dtype=torch.float32, device="cpu", base=pt)
    assert loaded.task == "causal_lm" and loaded.adapter is not None and type(loaded.model) is GPTNeoXForCausalLM
    expected = merged.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert loaded.tokenizer.model_max_length == 24  # no tokenizer in the adapter dir: the base's

    tokenizer = AutoTokenizer.from_pretrained(pt)
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(adapter)
    assert load_model_for_finetune(adapter, device="cpu", base=pt).tokenizer.model_max_length == 16
