"""A user-brought world with Pythia-shaped models, for running the whole lineage at scale.

Writes, under ``--root``: two model directories (a random-init GPT-NeoX with the real Pythia
shape, vocab 50304, and a "fine-tuned" copy with every weight moved by 1 % of its RMS; both in
``--dtype``, bfloat16 by default as published checkpoints are), a tokenizer trained on the
corpus, an inbox of JSONL shards (``--docs`` documents of about ``--doc-tokens`` tokens),
fine-tuning data, ``--queries`` queries and an ``msif.toml``. Then run, and measure, the real
entry point::

    python -m bench.lineage_scale --shape pythia-410m --root /tmp/w410 --queries 16
    /usr/bin/time -v msif materialize --config /tmp/w410/msif.toml --lake /tmp/w410/lake
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from .scale import SHAPES

PEOPLE = [f"{first} {last}" for first in ("Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal") for last in ("Ray", "Kim", "Lee", "Ng")]
CITIES = ["Paris", "Oslo", "Lima", "Rome", "Kyiv", "Cairo", "Quito", "Seoul"]
FILLER = "the river bends past old mills and quiet farms where bells ring at noon".split()


def _document(rng: random.Random, person: str, city: str, words: int) -> str:
    body = " ".join(rng.choice(FILLER) for _ in range(words))
    return f"{person} was born in {city} . {body} . {person} still visits {city} ."


def build(root: Path, shape: str, n_docs: int, doc_words: int, n_queries: int, shards: int, dtype: str, compute: dict) -> Path:
    from msif_assets.demo.tokenizer import build_tokenizer

    rng = random.Random(0)
    born = {p: rng.choice(CITIES) for p in PEOPLE}
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    texts = []
    for s in range(shards):
        rows = []
        for i in range(s, n_docs, shards):
            person = PEOPLE[i % len(PEOPLE)]
            rows.append({"doc_id": f"d{i:05d}", "text": _document(rng, person, born[person], doc_words)})
        (inbox / f"shard-{s:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts += [r["text"] for r in rows]
    questions = [(p, f"Where was {p} born ?", f" {born[p]}") for p in PEOPLE]
    tokenizer = build_tokenizer(texts + [q + a for _, q, a in questions], model_max_length=2048)
    w = SHAPES[shape]
    config = GPTNeoXConfig(
        vocab_size=w.vocab, hidden_size=w.hidden, num_hidden_layers=w.layers, num_attention_heads=w.heads,
        intermediate_size=w.mlp, max_position_embeddings=2048, rotary_pct=0.25, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    for name, scale in (("pt", 0.0), ("ft", 0.01)):
        if scale:
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(scale * p.float().pow(2).mean().sqrt() * torch.randn(p.shape, generator=generator))
        model.to(getattr(torch, dtype)).save_pretrained(root / name, safe_serialization=True)
        model.float()
        tokenizer.save_pretrained(root / name)
    (root / "finetune.jsonl").write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for _, q, a in questions))
    queries = [{"query_id": f"q{j:04d}", "prompt": questions[j % len(questions)][1], "completion": questions[j % len(questions)][2]}
               for j in range(n_queries)]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    toml = [
        "[lake]", f'root = "{root / "lake"}"', "", "[inputs]", f'inbox = "{inbox}"', f'pretrained_model = "{root / "pt"}"',
        f'finetuned_model = "{root / "ft"}"', f'finetune_data = "{root / "finetune.jsonl"}"', f'queries = "{root / "queries.jsonl"}"',
        "", "[compute]", *[f"{k} = {json.dumps(v)}" for k, v in compute.items()],
    ]
    (root / "msif.toml").write_text("\n".join(toml) + "\n")
    return root / "msif.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="pythia-410m", choices=sorted(SHAPES))
    parser.add_argument("--root", required=True)
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--doc-words", type=int, default=40)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--query-rank", type=int, default=32)
    parser.add_argument("--query-batch-size", type=int, default=8)
    parser.add_argument("--knn-k", type=int, default=4)
    args = parser.parse_args(argv)
    compute = {"query_rank": args.query_rank, "query_batch_size": args.query_batch_size, "knn_k": args.knn_k,
               "batch_size": 8, "dampings": ["rel:0.1"]}
    path = build(Path(args.root), args.shape, args.docs, args.doc_words, args.queries, args.shards, args.dtype, compute)
    print(f"wrote {path}\nrun: /usr/bin/time -v msif materialize --config {path} --lake {Path(args.root) / 'lake'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
