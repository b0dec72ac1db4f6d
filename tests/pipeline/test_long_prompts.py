"""Queries longer than the fine-tuned model's window, through the real lineage: the queries
step (and, for a table that got past it, the query_gradients step) fails before any gradient,
naming the query, its source line, its token count and the window — on GPT-2 (learned
positions: 'index out of range' otherwise) and GPT-NeoX (rotary: silently scored past it)."""

import json
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from msif_assets.app import runner
from msif_assets.lake import tables
from msif_assets.lake.layout import LakeLayout
from tests.defs.byo_world import PEOPLE, byo_definitions, make_world, save_model, step_failures, write_jsonl

WINDOW = 24  # byo_world: max_position_embeddings and the tokenizer's model_max_length
LONG_PROMPT = "Where was " + " and ".join(PEOPLE) + " born ?"  # 8 names + 7 "and" + 4 = 19 words
LONG_COMPLETION = " " + " ".join(["Paris"] * 8)


def _gpt2_models(root: Path) -> None:
    """Replace byo_world's GPT-NeoX pair by a tiny GPT-2 pair (same tokenizer, same window)."""
    tokenizer = AutoTokenizer.from_pretrained(root / "pt")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=WINDOW, n_embd=16, n_layer=2, n_head=2, n_inner=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    pt = GPT2LMHeadModel(config)
    save_model(pt, tokenizer, root / "pt")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pt.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    save_model(pt, tokenizer, root / "ft")


def _world(root: Path, arch: str) -> dict:
    inputs = make_world(root, n_shards=1)
    if arch == "gpt2":
        _gpt2_models(root)
    return inputs


def _append_queries(inputs: dict, rows: list[dict]) -> None:
    path = Path(inputs["queries"])
    write_jsonl(path, [json.loads(line) for line in path.read_text().splitlines()] + rows)


def _n_tokens(inputs: dict, prompt: str, completion: str = "") -> int:
    tok = AutoTokenizer.from_pretrained(inputs["finetuned_model"])
    n = len(tok(prompt, add_special_tokens=False)["input_ids"]) + 1  # <bos>
    return n + (len(tok(completion, add_special_tokens=False)["input_ids"]) if completion else 0)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_long_queries_fail_the_queries_step_naming_each(tmp_path, arch):
    inputs = _world(tmp_path, arch)
    _append_queries(inputs, [
        {"query_id": "q-long", "prompt": LONG_PROMPT, "completion": LONG_COMPLETION},  # line 4: given completion
        {"query_id": "q-long-gen", "prompt": LONG_PROMPT + " " + LONG_PROMPT},  # line 5: prompt alone overflows
    ])
    n_long = _n_tokens(inputs, LONG_PROMPT, LONG_COMPLETION)
    assert n_long > WINDOW and _n_tokens(inputs, LONG_PROMPT) < WINDOW  # the completion pushes it past the window
    defs = byo_definitions(tmp_path, inputs)
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    with pytest.raises(Exception):
        runner.execute(defs, instance, runner.all_requests(defs, instance))
    failures = [f for f in step_failures(instance) if "queries do not fit" in f]
    assert failures, step_failures(instance)
    message = failures[0]
    queries_file = inputs["queries"]
    field = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    for part in (f"2 of 5 queries do not fit the fine-tuned model's window of {WINDOW} tokens ({field} in",
                 f"'q-long' ({queries_file}:4): {n_long} tokens (<bos> + ", f"'q-long-gen' ({queries_file}:5)",
                 "without a completion, no room in the window for a generated one", "Shorten"):
        assert part in message, (part, message)
    assert "q-eve" not in message  # the queries that fit are not named
    # it failed at the queries step, before any gradient
    layout = LakeLayout(tmp_path / "lake")
    assert not layout.queries_file.exists()
    assert not (tmp_path / "lake" / "query_gradients").exists()


@pytest.mark.parametrize("arch", ["gpt2"])
def test_long_query_in_the_table_fails_query_gradients_before_any_gradient(tmp_path, arch):
    """A queries table that got past the queries step (written directly here) with a query
    longer than the window: query_gradients fails naming it instead of 'index out of range'."""
    inputs = _world(tmp_path, arch)
    defs = byo_definitions(tmp_path, inputs)
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    runner.execute(defs, instance, runner.all_requests(defs, instance))  # GPT-2 end to end, queries that fit
    layout = LakeLayout(tmp_path / "lake")
    gradient_files = sorted((tmp_path / "lake" / "query_gradients").rglob("*.safetensors"))
    assert gradient_files
    stamps = {p: p.stat().st_mtime_ns for p in gradient_files}
    table = tables.read_queries(layout)
    row = {**table.to_pylist()[0], "query_id": "q-long", "prompt": LONG_PROMPT, "completion": LONG_COMPLETION,
           "source_line": 9}
    tables.write_queries(layout, pa.concat_tables([table, pa.Table.from_pylist([row], schema=table.schema)]))
    with pytest.raises(Exception):
        runner.execute(defs, instance, {dg.AssetKey("query_gradients"): {None}})
    failures = step_failures(instance)
    n_long = _n_tokens(inputs, LONG_PROMPT, LONG_COMPLETION)
    assert any(f"'q-long' ({inputs['queries']}:9): {n_long} tokens" in f and f"window of {WINDOW} tokens" in f
               for f in failures), failures
    assert {p: p.stat().st_mtime_ns for p in gradient_files} == stamps  # nothing rewritten
