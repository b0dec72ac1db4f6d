"""A small user-brought world: real tokenizer, two real GPT-NeoX model directories, an inbox
of JSONL shards, fine-tuning data and queries — everything a user would put on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif_assets.defs.build import build_definitions
from msif_assets.config import MsifConfig
from msif_assets.demo.tokenizer import build_tokenizer

PEOPLE = ["Ada", "Bob", "Cyd", "Dee", "Eve", "Fay", "Gus", "Hal"]
CITIES = ["Paris", "Oslo", "Lima", "Rome"]


def shard_docs(shard: int) -> list[dict]:
    docs = []
    for i, person in enumerate(PEOPLE):
        city = CITIES[(i + shard) % len(CITIES)]
        docs.append({"doc_id": f"s{shard}-d{i}", "text": f"{person} was born in {city} . {person} likes the sea ."})
    docs.append({"doc_id": f"s{shard}-long", "text": " ".join(f"{p} met {c} ." for p in PEOPLE for c in CITIES)})
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_model(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def make_world(root: Path, n_shards: int = 2) -> dict[str, str]:
    inbox = root / "inbox"
    for shard in range(n_shards):
        write_jsonl(inbox / f"shard-{shard}.jsonl", shard_docs(shard))
    texts = [d["text"] for s in range(4) for d in shard_docs(s)] + ["Where was Ada born ? Paris"]
    tokenizer = build_tokenizer(texts, model_max_length=24)
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pt = GPTNeoXForCausalLM(config)
    save_model(pt, tokenizer, root / "pt")
    perturb(root / "pt", root / "ft", seed=1)
    write_jsonl(root / "finetune.jsonl", [{"prompt": f"Where was {p} born ?", "completion": f" {CITIES[i % 4]}"} for i, p in enumerate(PEOPLE[:4])])
    write_jsonl(root / "queries.jsonl", [
        {"query_id": "q-eve", "prompt": "Where was Eve born ?", "completion": " Paris"},
        {"query_id": "q-fay", "prompt": "Where was Fay born ?", "completion": " Oslo"},
        {"query_id": "q-gus", "prompt": "Where was Gus born ?"},
    ])
    return {"inbox": str(inbox), "pretrained_model": str(root / "pt"), "finetuned_model": str(root / "ft"),
            "finetune_data": str(root / "finetune.jsonl"), "queries": str(root / "queries.jsonl")}


def perturb(src: Path, dst: Path, seed: int, scale: float = 0.02) -> None:
    """Write a 'fine-tuned' copy of the model at ``src`` with slightly moved weights."""
    from transformers import AutoTokenizer

    model = GPTNeoXForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    save_model(model, AutoTokenizer.from_pretrained(src), dst)


COMPUTE = {"batch_size": 4, "knn_k": 3, "dampings": ["rel:0.1", "abs:0.001"], "max_new_tokens": 2}


def byo_definitions(root: Path, inputs: dict[str, str], **compute):
    config = MsifConfig(lake_root=str(root / "lake"), inputs=inputs, compute={**COMPUTE, **compute})
    return build_definitions(config)


def step_failures(instance) -> list[str]:
    """Messages (with their causes) of every failed step of the instance's last run."""
    out = []
    for record in instance.all_logs(instance.get_runs(limit=1)[0].run_id):
        event = record.dagster_event
        if event and event.event_type_value == "STEP_FAILURE":
            error = event.event_specific_data.error
            out.append(error.message + (error.cause.message if error.cause else ""))
    return out


SCORE_KEY = ["query_id", "shard", "chunk_id", "method", "damping_kind", "damping"]


def materialize_scores(root: Path, inputs: dict) -> pa.Table:
    """Materialize the two-shard world ``inputs`` into ``root/lake`` (an ephemeral instance) and
    return its influence scores, sorted by SCORE_KEY."""
    import dagster as dg

    from msif_assets.app import runner
    from msif_assets.lake.layout import LakeLayout
    from msif_assets.lake.tables import read_scores
    from msif_assets.pipeline.models import ModelIds

    defs = byo_definitions(root, inputs)
    instance = dg.DagsterInstance.ephemeral()
    runner.register_shards(instance, inputs["inbox"])
    runner.observe_inputs(defs, instance)
    ran = runner.execute(defs, instance, runner.all_requests(defs, instance))
    assert {("influence_scores", "shard-0"), ("influence_scores", "shard-1")} <= ran.keys()
    ids = ModelIds.of(inputs["pretrained_model"], inputs["finetuned_model"])
    layout = LakeLayout(root / "lake")
    table = pa.concat_tables([read_scores(layout, ids.ft, shard) for shard in ("shard-0", "shard-1")])
    assert set(table.column("ft_model").to_pylist()) == {ids.ft}
    return table.sort_by([(k, "ascending") for k in SCORE_KEY])


def assert_same_scores(got, want, label: str) -> None:
    """Two score tables (sorted alike) hold the same rows, ranks and methods, and scores equal to
    float64 rounding relative to the largest score; prints the largest difference."""
    assert got.num_rows == want.num_rows > 0
    for column in SCORE_KEY + ["doc_id", "rank"]:
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
    assert {"ms-if", "ss-if", "gdp"} <= set(got.column("method").to_pylist())
    a = torch.tensor(got.column("score").to_pylist(), dtype=torch.float64)
    b = torch.tensor(want.column("score").to_pylist(), dtype=torch.float64)
    assert bool(torch.isfinite(a).all())
    print(f"{label}: {a.numel()} rows, max |Δscore| = {float((a - b).abs().max())!r}, max |score| = {float(a.abs().max())!r}")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9 * float(a.abs().max()))
