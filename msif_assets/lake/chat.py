"""Chat-formatted queries and fine-tuning rows: ``messages`` turns rendered with the fine-tuned
model's chat template.

A conversation is a list of ``{"role", "content"}`` turns whose last turn is the assistant's
answer. The prompt is everything before that answer as the template renders it, generation
prompt included; the completion (the tokens f(q) and the fine-tuning loss cover) is the rest of
the full rendering. The boundary is found on tokens: the rendering of the turns before the
answer with ``add_generation_prompt=True`` must be a token prefix of the full conversation's.

The completion keeps the template's end-of-turn tokens after the answer (``<|im_end|>``,
``<|eot_id|>``, ``</s>`` …): a chat fine-tune is trained on them (they are how the model learned
to stop), and which trailing tokens are "end of turn" is template-specific, so any stripping
rule would be a guess that differs between templates.

Tokens are the template's own (``add_special_tokens=False``, as in ``apply_chat_template``);
with ``prepend_bos`` a ``<bos>`` is put first unless the template already wrote it, matching
msif's prompt/completion queries, so a chat query and the prompt/completion query whose texts
are the rendered strings are measured on the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from msif_assets.lake.inputs import InputError, _unicode_problem

__all__ = ["ChatRendering", "EXAMPLE_TURNS", "parse_messages", "transcript", "messages_from_meta", "render_chat"]

EXAMPLE_TURNS = ('[{"role": "user", "content": "Where was Ada born?"}, '
                 '{"role": "assistant", "content": "London"}]')
Turn = dict[str, Any]


@dataclass(frozen=True)
class ChatRendering:
    """One conversation rendered and tokenized: ``prompt_ids + completion_ids`` is the full
    conversation; ``prompt_text`` is the template's rendering of the prompt."""

    prompt_text: str
    full_text: str
    prompt_ids: list[int]
    completion_ids: list[int]


def parse_messages(value: object, where: str) -> list[Turn]:
    """Validate a ``messages`` field; ``where`` is ``file:line``. Raises InputError naming the
    field (``messages[2].role``) and the fix."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise InputError(f"{where}: messages — expected a non-empty list of {{\"role\", \"content\"}} turns, got {got} — "
                         f"write e.g. {EXAMPLE_TURNS}")
    for i, turn in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise InputError(f"{where}: {field} — expected an object with \"role\" and \"content\", got "
                             f"{type(turn).__name__} — write each turn as {{\"role\": \"user\", \"content\": \"…\"}}")
        role = turn.get("role")
        if not isinstance(role, str) or not role.strip():
            problem = "missing" if role is None else f"expected a non-empty string, got {role!r}"
            raise InputError(f"{where}: {field}.role — {problem} — give each turn a role such as \"system\", "
                             "\"user\" or \"assistant\"")
        content = turn.get("content")
        if not isinstance(content, str):
            problem = "missing" if content is None else f"expected a string, got {type(content).__name__}"
            raise InputError(f"{where}: {field}.content — {problem} — give each turn its text as a string "
                             "(content parts, images and tool calls are not supported)")
        for part, text in (("role", role), ("content", content)):
            problem = _unicode_problem(text)
            if problem is not None:
                raise InputError(f"{where}: {field}.{part} — {problem}")
    last = len(value) - 1
    if last == 0:
        raise InputError(f"{where}: messages — only one turn: the answer needs a conversation to answer — put at least "
                         f"one turn (e.g. the user's question) before the assistant's answer, e.g. {EXAMPLE_TURNS}")
    if value[last]["role"] != "assistant":
        raise InputError(f"{where}: messages[{last}].role — the last turn is {value[last]['role']!r}, but it must be "
                         "the assistant's answer to attribute — end the conversation with "
                         "{\"role\": \"assistant\", \"content\": \"<the answer>\"}")
    if not value[last]["content"].strip():
        raise InputError(f"{where}: messages[{last}].content — the assistant's answer is empty: nothing to measure — "
                         "give the answer text")
    return value


def transcript(messages: list[Turn]) -> str:
    """A plain, template-free view of the turns before the answer (``role: content`` lines)."""
    return "\n".join(f"{t['role']}: {t['content']}" for t in messages[:-1])


def messages_from_meta(meta: str | None) -> list[Turn] | None:
    """The conversation a queries-table row was read from (kept in ``meta.messages``), or None
    for a prompt/completion row."""
    if not meta:
        return None
    messages = json.loads(meta).get("messages")
    return messages if isinstance(messages, list) else None


def render_chat(tokenizer: Any, messages: list[Turn], where: str, what: str, prepend_bos: bool) -> ChatRendering:
    """Render ``messages`` with ``tokenizer``'s chat template and split prompt from completion on
    a token boundary. ``where`` (``file:line``) and ``what`` (e.g. ``query 'q1'``) name the row in
    errors. Raises InputError when the tokenizer has no template, the template fails, or its
    generation prompt is not a token prefix of the full conversation."""
    if not getattr(tokenizer, "chat_template", None):
        path = getattr(tokenizer, "name_or_path", "")
        name = f"the tokenizer in {path}" if path else "the fine-tuned model's tokenizer"
        raise InputError(f"{where}: messages — {what}: {name} has no chat template, so a conversation "
                         "cannot be rendered as the model saw it — write this row as prompt/completion, or add the "
                         "template the model was fine-tuned with (chat_template.jinja or \"chat_template\" in "
                         "tokenizer_config.json)")
    try:
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as exc:  # a template's raise_exception(...) or any Jinja error
        raise InputError(f"{where}: messages — {what}: the chat template failed: {exc} — fix the conversation to "
                         "suit the template (e.g. role order), or write this row as prompt/completion") from exc
    prompt_ids, full_ids = _ids(tokenizer, prompt_text), _ids(tokenizer, full_text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None and full_ids[:1] != [bos]:
        prompt_ids, full_ids = [bos] + prompt_ids, [bos] + full_ids
    if full_ids[: len(prompt_ids)] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(full_ids))
        shown = lambda ids: repr(tokenizer.convert_ids_to_tokens(ids[at: at + 3]))  # noqa: E731
        raise InputError(
            f"{where}: messages — {what}: the chat template's rendering of the turns before the answer, with the "
            f"generation prompt, is not a token prefix of the full conversation (token {at}: {shown(prompt_ids)} vs "
            f"{shown(full_ids)}), so the answer's tokens cannot be told from the prompt's — make the template's "
            "generation prompt exactly the start of its assistant turn (e.g. no trailing space), or write this row "
            "as prompt/completion")
    if not prompt_ids:
        raise InputError(f"{where}: messages — {what}: the rendered prompt is empty, so the answer's first token has no "
                         "context — add a user turn before the answer")
    completion_ids = full_ids[len(prompt_ids):]
    if not completion_ids:
        raise InputError(f"{where}: messages — {what}: the chat template renders nothing for the final assistant "
                         "turn — check that the template writes assistant turns' content")
    return ChatRendering(prompt_text, full_text, prompt_ids, completion_ids)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
