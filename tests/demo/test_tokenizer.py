from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from msif_assets.demo.tokenizer import SPECIAL_TOKENS, save_world_tokenizer, world_texts
from msif_assets.demo.world import generate_world


@pytest.fixture(scope="module")
def world_and_tokenizer(tmp_path_factory):
    from msif_assets.demo.world import WorldConfig

    from .tiny import TINY_WORLD

    world = generate_world(WorldConfig(**{**TINY_WORLD, "qa_docs_per_finetune_fact": 1}))
    directory = tmp_path_factory.mktemp("tok")
    save_world_tokenizer(world, directory, model_max_length=64)
    return world, AutoTokenizer.from_pretrained(directory)


def test_every_world_text_round_trips(world_and_tokenizer):
    world, tok = world_and_tokenizer
    for text in world_texts(world):
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text.lstrip(" ")


def test_special_tokens_and_bos(world_and_tokenizer):
    _, tok = world_and_tokenizer
    assert [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token] == list(SPECIAL_TOKENS)
    assert len({tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id}) == 4
    ids = tok("Question: Where was")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok.model_max_length == 64


def test_names_and_answers_are_single_tokens(world_and_tokenizer):
    world, tok = world_and_tokenizer
    for e in world.entities:
        assert len(tok(" " + e.first_name, add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(" " + e.last_name, add_special_tokens=False)["input_ids"]) == 1
        for _, answer in e.facts:
            assert len(tok(" " + answer, add_special_tokens=False)["input_ids"]) == 1


def test_prompt_plus_completion_tokenizes_as_concatenation(world_and_tokenizer):
    world, tok = world_and_tokenizer
    for q in (*world.finetune, *world.queries):
        joint = tok(q.prompt + q.completion)["input_ids"]
        parts = tok(q.prompt)["input_ids"] + tok(q.completion, add_special_tokens=False)["input_ids"]
        assert joint == parts


def test_unknown_words_map_to_unk(world_and_tokenizer):
    _, tok = world_and_tokenizer
    ids = tok("Zzyzx was born", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.unk_token_id and tok.unk_token_id not in ids[1:]


def test_same_world_same_vocabulary(tmp_path, world_and_tokenizer):
    world, tok = world_and_tokenizer
    save_world_tokenizer(world, tmp_path / "again", model_max_length=64)
    assert AutoTokenizer.from_pretrained(tmp_path / "again").get_vocab() == tok.get_vocab()
