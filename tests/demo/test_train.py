from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXForCausalLM

from msif_assets.demo.evaluate import greedy_completions, qa_exact_match
from msif_assets.demo.sequences import IGNORE, qa_example
from msif_assets.demo.tokenizer import save_world_tokenizer
from msif_assets.demo.train import (
    TRAINING_RECORD,
    TrainConfig,
    evaluate_qa,
    finetune,
    pretrain,
    read_training_record,
    relative_param_distance,
)
from msif_assets.demo.world import WorldConfig, generate_world

from .tiny import TINY_TRAIN, TINY_WORLD


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny world with both models trained once for the whole module."""
    root = tmp_path_factory.mktemp("train")
    world = generate_world(WorldConfig(**TINY_WORLD))
    cfg = TrainConfig(**TINY_TRAIN)
    save_world_tokenizer(world, root / "tok", cfg.max_length)
    pt = pretrain(world, root / "tok", root / "pt", cfg)
    ft = finetune(pt, world, root / "ft", cfg)
    return world, cfg, pt, ft


def test_models_are_saved_as_safetensors_and_reload(trained):
    world, cfg, pt, ft = trained
    for d in (pt, ft):
        names = {p.name for p in d.iterdir()}
        assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
        assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
        assert not any(p.name.startswith(".") for p in d.parent.iterdir()), "temp directories left behind"
        model = AutoModelForCausalLM.from_pretrained(d)
        assert isinstance(model, GPTNeoXForCausalLM)
        assert model.config.num_hidden_layers == cfg.num_layers and model.config.hidden_size == cfg.hidden_size
        assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(d))
    record = read_training_record(ft)
    assert record["stage"] == "finetune" and record["attn_implementation"] == cfg.attn_implementation
    assert TrainConfig.from_dict(record["train_config"]) == cfg


def test_pretraining_lowers_the_loss(trained):
    _, cfg, pt, _ = trained
    losses = read_training_record(pt)["epoch_losses"]
    assert len(losses) == cfg.pretrain_epochs
    assert losses[-1] < 0.8 * losses[0]


def test_training_is_deterministic_under_a_seed(trained, tmp_path):
    world, cfg, pt, _ = trained
    again = pretrain(world, pt, tmp_path / "pt2", cfg)
    assert relative_param_distance(pt, again) == 0.0


def test_relative_distance_is_small_and_positive(trained):
    _, _, pt, ft = trained
    assert relative_param_distance(pt, pt) == 0.0
    d = relative_param_distance(pt, ft)
    assert 0.0 < d < 1.0


def test_finetune_loss_is_on_completion_tokens_only(trained):
    world, cfg, pt, _ = trained
    tok = AutoTokenizer.from_pretrained(pt)
    q = world.finetune[0]
    ex = qa_example(tok, q.prompt, q.completion, cfg.max_length)
    n_prompt = len(tok(q.prompt)["input_ids"])
    assert all(label == IGNORE for label in ex.labels[:n_prompt])
    assert list(ex.labels[n_prompt:]) == tok(q.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_batched_left_padded_decoding_matches_one_by_one(trained):
    world, _, _, ft = trained
    tok = AutoTokenizer.from_pretrained(ft)
    model = AutoModelForCausalLM.from_pretrained(ft).eval()
    prompts = [q.prompt for q in world.finetune[:6]] + ["Question: Where was"]
    batched = greedy_completions(model, tok, prompts, max_new_tokens=3, batch_size=len(prompts))
    single = [greedy_completions(model, tok, [p], max_new_tokens=3)[0] for p in prompts]
    assert batched == single


def test_exact_match_counts_real_hits(trained):
    world, _, _, ft = trained
    tok = AutoTokenizer.from_pretrained(ft)
    model = AutoModelForCausalLM.from_pretrained(ft).eval()
    rows = list(world.finetune)
    horizon = 6
    preds = greedy_completions(model, tok, [r.prompt for r in rows], max_new_tokens=horizon)
    # Rows whose target is exactly what the model says (it stopped with <eos>) must all be hits.
    echoed = [{"prompt": r.prompt, "completion": " " + tok.decode(p)}
              for r, p in zip(rows, preds) if 0 < len(p) < horizon and tok.unk_token_id not in p]
    assert echoed, "the fine-tuned tiny model never stops with <eos>; train it longer"
    acc, hits = qa_exact_match(model, tok, echoed)
    assert acc == 1.0 and all(hits)
    wrong = [{"prompt": r.prompt, "completion": " Zzyzx"} for r in rows]
    assert qa_exact_match(model, tok, wrong)[0] == 0.0
    acc = evaluate_qa(ft, world.queries)
    assert 0.0 <= acc <= 1.0


def test_attention_implementation_is_recorded(trained, tmp_path):
    world, cfg, pt, _ = trained
    eager = replace(cfg, attn_implementation="eager", pretrain_epochs=1)
    out = pretrain(world, pt, tmp_path / "eager", eager)
    assert read_training_record(out)["attn_implementation"] == "eager"
    saved = json.loads((out / TRAINING_RECORD).read_text())
    assert saved["train_config"]["attn_implementation"] == "eager"


@pytest.mark.parametrize("bad", [
    dict(hidden_size=30, num_heads=4), dict(attn_implementation="flash"), dict(pretrain_lr=0.0),
    dict(pretrain_epochs=0), dict(max_length=0),
])
def test_train_config_validation_names_the_field(bad):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**bad)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        relative_param_distance(tmp_path, tmp_path)
    assert torch.get_num_threads() >= 1
