"""Chat-formatted queries and fine-tuning data through real materializations: a lake fed
``messages`` rows scores exactly like one fed the prompt/completion rows whose texts are the
template's renderings, and f(q) covers only the final assistant answer."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from msif_assets.app import runner
from msif_assets.config import MsifConfig
from msif_assets.demo.tokenizer import build_tokenizer
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.factor_store import load_tensors
from msif_assets.lake.inputs import InputError
from msif_assets.lake.layout import LakeLayout
from msif_assets.lake.tables import read_queries
from msif_assets.lake.training_inputs import read_finetune_file
from msif_assets.pipeline.factors import finetune_examples
from msif_assets.pipeline.models import load_finetuned
from msif_assets.pipeline.queries import load_queries, query_examples

from ..lake.test_chat_inputs import TEMPLATE
from .byo_world import CITIES, PEOPLE, byo_definitions, make_world, perturb, save_model, shard_docs, write_jsonl

ASK = "Where was {} born ?"
QUERIES = {
    "q-eve": [{"role": "system", "content": "Answer briefly ."}, {"role": "user", "content": ASK.format("Eve")},
              {"role": "assistant", "content": "Paris"}],
    "q-fay": [{"role": "user", "content": ASK.format("Fay")}, {"role": "assistant", "content": "Oslo"}],
    "q-gus": [{"role": "user", "content": ASK.format("Gus")}, {"role": "assistant", "content": "Lima"},
              {"role": "user", "content": ASK.format("Hal")}, {"role": "assistant", "content": "Rome"}],
}
FINETUNE = [[{"role": "user", "content": ASK.format(p)}, {"role": "assistant", "content": CITIES[i % 4]}]
            for i, p in enumerate(PEOPLE[:4])]
SCORES = "SELECT query_id, chunk_id, method, damping_kind, damping, score, score_mlp, score_attn FROM influence " \
         "WHERE method <> 'bm25' ORDER BY ALL"  # BM25 ranks on the query's text, which differs by design


def make_chat_world(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Models whose tokenizer has a chat template; the inputs of a chat lake and of the
    equivalent prompt/completion lake (texts = the template's renderings)."""
    inbox = root / "inbox"
    write_jsonl(inbox / "shard-0.jsonl", shard_docs(0))
    texts = [d["text"] for s in range(4) for d in shard_docs(s)] + ["system : user : assistant : Answer briefly . " + ASK]
    tokenizer = build_tokenizer(texts, model_max_length=64)
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_model(GPTNeoXForCausalLM(config), tokenizer, root / "pt")
    perturb(root / "pt", root / "ft", seed=1)
    assert AutoTokenizer.from_pretrained(root / "ft").chat_template == TEMPLATE

    def rendered(turns: list[dict]) -> dict[str, str]:
        prompt = tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns, tokenize=False)
        assert full.startswith(prompt)
        return {"prompt": prompt, "completion": full[len(prompt):]}

    write_jsonl(root / "chat" / "queries.jsonl", [{"query_id": q, "messages": t} for q, t in QUERIES.items()])
    write_jsonl(root / "chat" / "finetune.jsonl", [{"messages": t} for t in FINETUNE])
    write_jsonl(root / "plain" / "queries.jsonl", [{"query_id": q, **rendered(t)} for q, t in QUERIES.items()])
    write_jsonl(root / "plain" / "finetune.jsonl", [rendered(t) for t in FINETUNE])
    models = {"inbox": str(inbox), "pretrained_model": str(root / "pt"), "finetuned_model": str(root / "ft")}
    return tuple({**models, "queries": str(root / form / "queries.jsonl"),  # type: ignore[return-value]
                  "finetune_data": str(root / form / "finetune.jsonl")} for form in ("chat", "plain"))


def _materialize(root: Path, inputs: dict[str, str]) -> Path:
    defs = byo_definitions(root, inputs, all_chunks_below=100, methods=["ms-if", "ss-if", "gdp", "repsim", "bm25"])
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    graph, scores = defs.resolve_asset_graph(), dg.AssetKey("influence_scores")
    keys = [k for k in graph.get_ancestor_asset_keys(scores) | {scores} if k in graph.materializable_asset_keys]
    runner.execute(defs, instance, runner.all_requests(defs, instance, keys))  # the evaluations are not needed here
    return root / "lake"


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    chat, plain = make_chat_world(root)
    return chat, _materialize(root / "chat", chat), _materialize(root / "plain", plain)


def test_chat_rows_score_like_the_rendered_prompt_completion_rows(lakes):
    _, chat_lake, plain_lake = lakes
    with Catalog.open(chat_lake) as a, Catalog.open(plain_lake) as b:
        got, want = a.query(SCORES).to_pylist(), b.query(SCORES).to_pylist()
    assert len(got) == len(want) > 0 and {r["method"] for r in got} == {"ms-if", "ss-if", "gdp", "repsim"}
    for g, w in zip(got, want):
        assert {k: g[k] for k in ("query_id", "chunk_id", "method", "damping")} == {k: w[k] for k in ("query_id", "chunk_id", "method", "damping")}
        for column in ("score", "score_mlp", "score_attn"):
            if w[column] is None:
                assert g[column] is None
            else:
                assert g[column] == pytest.approx(w[column], rel=1e-5, abs=1e-7 * max(1.0, abs(w["score"])))
    files = sorted(p.relative_to(chat_lake) for p in (chat_lake / "query_gradients").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(plain_lake) for p in (plain_lake / "query_gradients").rglob("*.safetensors"))
    for rel in files:
        (got_t, _), (want_t, _) = load_tensors(chat_lake / rel), load_tensors(plain_lake / rel)
        assert got_t.keys() == want_t.keys()
        for name in want_t:
            torch.testing.assert_close(got_t[name], want_t[name], rtol=1e-5, atol=1e-8)


def test_the_query_table_is_readable_and_measures_only_the_answer(lakes):
    inputs, chat_lake, _ = lakes
    queries = read_queries(LakeLayout(chat_lake))
    rows = queries.to_pylist()
    assert [r["query_id"] for r in rows] == list(QUERIES)
    ft = load_finetuned(inputs["finetuned_model"], MsifConfig(inputs=inputs).compute)
    tok = ft.tokenizer
    for row in rows:
        turns = QUERIES[row["query_id"]]
        assert row["prompt"] == tok.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
        assert row["completion"] == turns[-1]["content"]
        assert json.loads(row["meta"]) == {"messages": turns, "completion_source": "given"}
    for row, example in zip(rows, query_examples(queries, ft)):
        measured = [t for t, m in zip(example.input_ids, example.target_mask) if m]
        assert tok.convert_ids_to_tokens(measured) == ["\u2581" + QUERIES[row["query_id"]][-1]["content"], "<eos>"]
        n = len(example.input_ids)
        assert example.target_mask == (False,) * (n - 2) + (True, True)  # earlier turns, answers included, are context
    assert tok.convert_ids_to_tokens(query_examples(queries, ft)[2].input_ids).count("\u2581Lima") == 1  # q-gus


def test_a_model_without_a_chat_template_names_the_row(tmp_path):
    inputs = make_world(tmp_path / "byo", n_shards=1)  # its tokenizer has no chat template
    ft = load_finetuned(inputs["finetuned_model"], MsifConfig(inputs=inputs).compute)
    queries = tmp_path / "queries.jsonl"
    write_jsonl(queries, [{"query_id": "q-eve", "prompt": "Where was Eve born ?", "completion": " Paris"},
                          {"query_id": "q-fay", "messages": QUERIES["q-fay"]}])
    with pytest.raises(InputError, match=rf"{queries}:2: messages — query 'q-fay': the tokenizer in .*ft has no chat "
                                         r"template.* write this row as prompt/completion, or add the template"):
        load_queries(queries, ft, MsifConfig(inputs=inputs).compute)
    finetune = tmp_path / "finetune.jsonl"
    write_jsonl(finetune, [{"messages": t} for t in FINETUNE])
    with pytest.raises(InputError, match=rf"{finetune}:1: messages — fine-tuning row: the tokenizer in .*ft has no chat template"):
        finetune_examples(read_finetune_file(finetune), ft)


def test_a_template_whose_generation_prompt_is_no_prefix_names_the_query(lakes, tmp_path):
    inputs, _, _ = lakes
    ft = load_finetuned(inputs["finetuned_model"], MsifConfig(inputs=inputs).compute)
    ft.tokenizer.chat_template = TEMPLATE.replace("assistant :{% endif %}", "assistant : {% endif %}")
    with pytest.raises(InputError, match=r"queries\.jsonl:1: messages — query 'q-eve': .* not a token prefix"):
        load_queries(inputs["queries"], ft, MsifConfig(inputs=inputs).compute)


def test_editing_the_chat_template_is_a_new_finetuned_model(lakes, tmp_path):
    import shutil

    from msif_assets.lake.models import fingerprint_model_dir

    inputs, _, _ = lakes
    copy = tmp_path / "ft"
    shutil.copytree(inputs["finetuned_model"], copy)
    before = fingerprint_model_dir(copy)
    template = copy / "chat_template.jinja"
    assert template.is_file()  # where transformers saves a tokenizer's template
    template.write_text(TEMPLATE.replace("assistant :{% endif %}", "assistant : {% endif %}"))
    assert fingerprint_model_dir(copy) != before  # so chat queries and the fine-tuned factors are recomputed
