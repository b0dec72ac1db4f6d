"""Accuracy of low-rank query vectors against full rank, on a materialized lake.

For every influence score key of the lake's settings (MS-IF and SS-IF at each damping, GDP) the
query vectors are truncated to each rank and all chunks of the lake are scored against both:
the table gives the Pearson/Spearman correlation of the score matrices (all (chunk, query)
pairs), the mean per-query Spearman, and the fact-tracing MRR (document score = max over its
chunks, first gold document's rank) at full rank and at each rank, plus the storage ratio.

    .venv/bin/python -m bench.lowrank --lake lake --ranks 8 32 128     # after `make demo`

Writes bench/results/lowrank.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _mrr(scores: torch.Tensor, doc_ids: list[str], gold: list[set[str]]) -> float:
    """scores (N chunks, Q); mean over queries with gold of 1 / rank of the first gold document."""
    from msif_assets.engine.metrics import rank_by_score, reciprocal_rank

    docs = sorted(set(doc_ids))
    index = {d: i for i, d in enumerate(docs)}
    rows = torch.tensor([index[d] for d in doc_ids])
    per_doc = torch.full((len(docs), scores.shape[1]), -torch.inf, dtype=torch.float64)
    per_doc = per_doc.scatter_reduce(0, rows[:, None].expand_as(scores), scores.double(), reduce="amax")
    rr = [reciprocal_rank(rank_by_score(docs, per_doc[:, j]), g) for j, g in enumerate(gold) if g]
    return float(np.mean(rr)) if rr else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--config", default=None, help="msif.toml of the lake (default: the default world)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowrank.json"))
    args = parser.parse_args(argv)

    from msif_assets.config import load_config
    from msif_assets.engine import Damping, preconditioned_queries, score_examples, sequence_gradients
    from msif_assets.engine.lowrank import LowRankQueries, stack, truncate
    from msif_assets.engine.metrics import pearson, spearman
    from msif_assets.lake import tables
    from msif_assets.lake.layout import LakeLayout
    from msif_assets.pipeline.corpus import chunk_examples
    from msif_assets.pipeline.factors import load_factors, pad_id_of
    from msif_assets.pipeline.models import ModelIds, load_pair
    from msif_assets.pipeline.queries import query_examples

    config = load_config(args.config)
    settings, inputs = config.compute, config.resolved_inputs()
    layout = LakeLayout(args.lake)
    ids = ModelIds.of(inputs["pretrained_model"], inputs["finetuned_model"])
    pair = load_pair(inputs["pretrained_model"], inputs["finetuned_model"], ids, settings)
    queries = tables.read_queries(layout)
    gold = [set(g or []) for g in queries.column("gold_doc_ids").to_pylist()]
    chunks = [tables.read_chunks(layout, s) for s in tables.list_shards(layout)]
    doc_ids = [d for c in chunks for d in c.column("doc_id").to_pylist()]
    examples = [e for c in chunks for e in chunk_examples(c, pair.pt.tokenizer.bos_token_id)]
    pt_f, ft_f = load_factors(layout.factors_file("pt", ids.pt)), load_factors(layout.factors_file("ft", ids.ft))
    grads = sequence_gradients(pair.ft.model, pair.specs, query_examples(queries, pair.ft), settings.batch_size, pad_id_of(pair.ft))
    keys = settings.gradient_keys
    vectors = {k: preconditioned_queries(k.method, grads, pt_f, ft_f, k.damping or Damping()) for k in keys}
    n_q = len(queries)

    def score(by_key: dict) -> dict:
        out = {}
        for on_ft in (False, True):
            chosen = [k for k in keys if k.on_finetuned_model == on_ft]
            if not chosen:
                continue
            model, pad = (pair.ft.model, pad_id_of(pair.ft)) if on_ft else (pair.pt.model, pad_id_of(pair.pt))
            stacked = {s.name: stack([by_key[k][s.name] for k in chosen]) for s in pair.specs}
            total = score_examples(model, pair.specs, stacked, examples, settings.batch_size, pad).total
            out.update({k: total[:, i * n_q : (i + 1) * n_q] for i, k in enumerate(chosen)})
        return out

    started = time.perf_counter()
    full = score(vectors)
    full_seconds = time.perf_counter() - started
    dense_numel = sum(v.numel() for v in vectors[keys[0]].values())
    rows = [{"method": k.method, "damping": k.damping_label, "rank": "full", "pearson": 1.0, "spearman": 1.0,
             "per_query_spearman": 1.0, "mrr": _mrr(full[k], doc_ids, gold), "storage": 1.0, "seconds": full_seconds / len(keys)}
            for k in keys]
    for rank in args.ranks:
        truncated = {k: {name: truncate(v, rank) for name, v in by_module.items()} for k, by_module in vectors.items()}
        started = time.perf_counter()
        got = score(truncated)
        seconds = time.perf_counter() - started
        stored = sum((v.left.numel() + v.right.numel()) if isinstance(v, LowRankQueries) else v.numel()
                     for v in truncated[keys[0]].values())
        for k in keys:
            a, b = got[k].numpy(), full[k].numpy()
            per_query = [spearman(a[:, j], b[:, j]) for j in range(n_q)]
            rows.append({"method": k.method, "damping": k.damping_label, "rank": rank, "pearson": pearson(a, b),
                         "spearman": spearman(a, b), "per_query_spearman": float(np.nanmean(per_query)),
                         "mrr": _mrr(got[k], doc_ids, gold), "storage": stored / dense_numel, "seconds": seconds / len(keys)})
    print(f"{len(examples)} chunks × {n_q} queries; {len(pair.specs)} modules; storage = fraction of the dense vectors")
    print(f"{'method':<7}{'damping':<12}{'rank':>6}{'pearson':>10}{'spearman':>10}{'q-spear':>10}{'MRR':>8}{'storage':>9}")
    for r in rows:
        print(f"{r['method']:<7}{r['damping']:<12}{str(r['rank']):>6}{r['pearson']:>10.5f}{r['spearman']:>10.5f}"
              f"{r['per_query_spearman']:>10.5f}{r['mrr']:>8.3f}{r['storage']:>9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"chunks": len(examples), "queries": n_q, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
