"""Chat-formatted queries and fine-tuning rows: the readers' validation, and rendering with a real
tokenizer's chat template (prompt/completion boundary on tokens, errors naming the row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msif_assets.demo.tokenizer import build_tokenizer
from msif_assets.lake.chat import messages_from_meta, render_chat
from msif_assets.lake.inputs import InputError
from msif_assets.lake.training_inputs import read_finetune_file, read_queries_file

# The generation prompt ends where the assistant turn's content begins, so it is a token prefix.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} :{{ ' ' + m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
TURNS = [{"role": "system", "content": "Answer briefly ."}, {"role": "user", "content": "Where was Eve born ?"},
         {"role": "assistant", "content": "Paris"}]


def chat_tokenizer(template: str | None = TEMPLATE):
    tokenizer = build_tokenizer(["system : user : assistant : Answer briefly . Where was Eve born ? Paris"], 64)
    tokenizer.chat_template = template
    return tokenizer


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_queries_are_read_with_their_turns_in_meta(tmp_path):
    f = _write(tmp_path / "q.jsonl", [
        {"query_id": "q1", "messages": TURNS, "gold_doc_ids": ["d1"], "topic": "geo"},
        {"query_id": "q2", "prompt": "Where was Eve born ?", "completion": " Paris"},
    ])
    table = read_queries_file(f)
    row = table.to_pylist()[0]
    assert row["prompt"] == "system: Answer briefly .\nuser: Where was Eve born ?"  # until the template renders it
    assert row["completion"] == "Paris" and row["gold_doc_ids"] == ["d1"]
    assert messages_from_meta(row["meta"]) == TURNS and json.loads(row["meta"])["topic"] == "geo"
    assert messages_from_meta(table.to_pylist()[1]["meta"]) is None


def test_chat_finetune_rows(tmp_path):
    data = read_finetune_file(_write(tmp_path / "ft.jsonl", [{"messages": TURNS, "note": "x"}, {"messages": TURNS[1:]}]))
    assert data.kind == "chat" and data.source == str(tmp_path / "ft.jsonl")
    assert [json.loads(m) for m in data.table.column("messages").to_pylist()] == [TURNS, TURNS[1:]]
    assert json.loads(data.table["meta"][0].as_py()) == {"note": "x"}


BAD_TURNS = [
    ("hello", r"messages — expected a non-empty list .* got str — write e\.g\."),
    ([], r"messages — expected a non-empty list .* got an empty list"),
    (["hi", {"role": "assistant", "content": "A"}], r"messages\[0\] — expected an object"),
    ([{"content": "Q"}, {"role": "assistant", "content": "A"}], r"messages\[0\]\.role — missing — give each turn a role"),
    ([{"role": "user"}, {"role": "assistant", "content": "A"}], r"messages\[0\]\.content — missing"),
    ([{"role": "user", "content": [{"type": "text", "text": "Q"}]}, {"role": "assistant", "content": "A"}],
     r"messages\[0\]\.content — expected a string, got list .* not supported"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A\ud800"}], r"messages\[1\]\.content — invalid Unicode"),
    ([{"role": "assistant", "content": "A"}], r"messages — only one turn"),
    ([{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}],
     r"messages\[1\]\.role — the last turn is 'user', but it must be the assistant's answer"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}], r"messages\[1\]\.content — .*empty"),
]


@pytest.mark.parametrize("messages, match", BAD_TURNS)
def test_bad_chat_queries_name_line_and_field(tmp_path, messages, match):
    f = _write(tmp_path / "q.jsonl", [{"query_id": "q1", "messages": TURNS}, {"query_id": "q2", "messages": messages}])
    with pytest.raises(InputError, match=r"q\.jsonl:2: " + match):
        read_queries_file(f)


@pytest.mark.parametrize("messages, match", BAD_TURNS)
def test_bad_chat_finetune_rows_name_line_and_field(tmp_path, messages, match):
    with pytest.raises(InputError, match=r"ft\.jsonl:1: " + match):
        read_finetune_file(_write(tmp_path / "ft.jsonl", [{"messages": messages}]))


@pytest.mark.parametrize("extra", ["prompt", "completion"])
def test_a_query_with_messages_and_prompt_is_ambiguous(tmp_path, extra):
    f = _write(tmp_path / "q.jsonl", [{"query_id": "q1", "messages": TURNS, extra: "x"}])
    with pytest.raises(InputError, match=rf"q\.jsonl:1: {extra} — given together with messages.* give either messages "
                                         r"or prompt/completion, not both"):
        read_queries_file(f)


@pytest.mark.parametrize("rows, match", [
    ([{"messages": TURNS, "prompt": "x"}], r"ft\.jsonl:1: prompt — given together with messages"),
    ([{"messages": TURNS, "text": "x"}], r"ft\.jsonl:1: text — given together with messages"),
    ([{"prompt": "q", "completion": "a"}, {"messages": TURNS}], r"ft\.jsonl:2: <line> — this line is chat but earlier lines are prompt_completion"),
])
def test_mixed_chat_finetune_files(tmp_path, rows, match):
    with pytest.raises(InputError, match=match):
        read_finetune_file(_write(tmp_path / "ft.jsonl", rows))


def test_only_the_final_assistant_turn_is_the_completion():
    tok = chat_tokenizer()
    turns = [{"role": "user", "content": "Where was Eve born ?"}, {"role": "assistant", "content": "Paris"},
             {"role": "user", "content": "Where was Eve born ?"}, {"role": "assistant", "content": "Eve"}]
    chat = render_chat(tok, turns, "q.jsonl:3", "query 'q1'", prepend_bos=True)
    # the earlier answer is context; the completion is the final answer and its end-of-turn token
    assert tok.convert_ids_to_tokens(chat.completion_ids) == ["\u2581Eve", "<eos>"]
    assert chat.prompt_ids[0] == tok.bos_token_id and "\u2581Paris" in tok.convert_ids_to_tokens(chat.prompt_ids)
    assert chat.prompt_text == tok.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
    assert chat.full_text == chat.prompt_text + " Eve<eos>"
    # the same tokens as the prompt/completion query whose texts are the rendered strings
    assert chat.prompt_ids == [tok.bos_token_id] + tok(chat.prompt_text, add_special_tokens=False)["input_ids"]
    assert chat.completion_ids == tok(" Eve<eos>", add_special_tokens=False)["input_ids"]


def test_bos_is_added_once():
    with_bos = chat_tokenizer("{{ bos_token }}" + TEMPLATE)
    chat = render_chat(with_bos, TURNS, "q.jsonl:1", "query 'q1'", prepend_bos=True)
    assert chat.prompt_ids.count(with_bos.bos_token_id) == 1 and chat.prompt_ids[0] == with_bos.bos_token_id
    plain = render_chat(chat_tokenizer(), TURNS, "ft.jsonl:1", "fine-tuning row", prepend_bos=False)
    assert with_bos.bos_token_id not in plain.prompt_ids  # fine-tuning rows: the template owns special tokens


def test_a_tokenizer_without_a_chat_template_is_named():
    with pytest.raises(InputError, match=r"q\.jsonl:4: messages — query 'q1': the fine-tuned model's tokenizer has no "
                                         r"chat template.* write this row as prompt/completion, or add the template"):
        render_chat(chat_tokenizer(None), TURNS, "q.jsonl:4", "query 'q1'", prepend_bos=True)


def test_a_generation_prompt_that_is_not_a_token_prefix_is_an_error():
    # a trailing space after "assistant :" is its own token, but merges into " Paris" in the full rendering
    trailing_space = TEMPLATE.replace("assistant :{% endif %}", "assistant : {% endif %}")
    with pytest.raises(InputError, match=r"q\.jsonl:2: messages — query 'q-eve': .* not a token prefix of the full "
                                         r"conversation \(token \d+: .* — make the template's generation prompt"):
        render_chat(chat_tokenizer(trailing_space), TURNS, "q.jsonl:2", "query 'q-eve'", prepend_bos=True)


def test_a_template_error_is_reported_with_the_row():
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" + TEMPLATE
    with pytest.raises(InputError, match=r"ft\.jsonl:5: messages — fine-tuning row: the chat template failed: no system turns"):
        render_chat(chat_tokenizer(strict), TURNS, "ft.jsonl:5", "fine-tuning row", prepend_bos=False)
