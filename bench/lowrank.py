"""Accuracy of low-rank query vectors against full rank, on a materialized lake.

For every influence score key of the lake's settings (MS-IF and SS-IF at each damping, GDP) the
query vectors are made exactly (dense) and by the pipeline's low-rank path at each rank (token-form
gradients, preconditioned and truncated in the eigenbasis; MS-IF also at each inner rank), and
all chunks of the lake are scored against both:
the table gives the Pearson/Spearman correlation of the score matrices (all (chunk, query)
pairs), the mean per-query Spearman, and the fact-tracing MRR (document score = max over its
chunks, first gold document's rank) at full rank and at each rank, plus the storage ratio.

    .venv/bin/python -m bench.lowrank --lake lake --ranks 8 32 128     # after `make demo`
    .venv/bin/python -m bench.lowrank --workload standard               # the benchmark workload

Writes bench/results/lowrank.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
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


def _lake_world(lake: str, config_path: str | None) -> dict:
    """The materialized lake's models, chunks, queries (with gold documents) and factors."""
    from msif_assets.config import load_config
    from msif_assets.lake import tables
    from msif_assets.lake.layout import LakeLayout
    from msif_assets.pipeline.corpus import chunk_examples
    from msif_assets.pipeline.factors import load_factors
    from msif_assets.pipeline.models import ModelIds, load_pair
    from msif_assets.pipeline.queries import query_examples

    config = load_config(config_path)
    settings, inputs = config.compute, config.resolved_inputs()
    layout = LakeLayout(lake)
    ids = ModelIds.of(inputs["pretrained_model"], inputs["finetuned_model"])
    pair = load_pair(inputs["pretrained_model"], inputs["finetuned_model"], ids, settings)
    queries = tables.read_queries(layout)
    chunks = [tables.read_chunks(layout, s) for s in tables.list_shards(layout)]
    return {
        "settings": settings, "pair": pair, "queries": query_examples(queries, pair.ft),
        "gold": [set(g or []) for g in queries.column("gold_doc_ids").to_pylist()],
        "doc_ids": [d for c in chunks for d in c.column("doc_id").to_pylist()],
        "candidates": [e for c in chunks for e in chunk_examples(c, pair.pt.tokenizer.bos_token_id)],
        "pt_factors": load_factors(layout.factors_file("pt", ids.pt)), "ft_factors": load_factors(layout.factors_file("ft", ids.ft)),
    }


def _bench_world(preset: str) -> dict:
    """The benchmark workload (random-init GPT-NeoX, random tokens, perturbed θ_ft): every
    candidate is its own document and no query has gold documents."""
    from types import SimpleNamespace

    from msif_assets.engine import Damping, FactorArgs, discover_modules, fit_factors
    from msif_assets.pipeline.settings import ComputeSettings

    from .workload import PRESETS, build_data, build_model, perturbed_copy

    w = PRESETS[preset]
    pt = build_model(w)
    ft = perturbed_copy(pt, w.ft_perturbation, seed=w.seed + 1)
    specs, data = discover_modules(pt), build_data(w)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2, bos_token_id=1)
    wrap = lambda model: SimpleNamespace(model=model, tokenizer=tokenizer, task="causal_lm")  # noqa: E731
    args = FactorArgs(batch_size=w.batch_size)
    settings = ComputeSettings(methods=("ms-if", "ss-if", "gdp"), batch_size=w.batch_size,
                               dampings=(Damping("absolute", w.damping), Damping("relative", 0.1)))
    return {
        "settings": settings, "pair": SimpleNamespace(pt=wrap(pt), ft=wrap(ft), specs=specs), "queries": data.queries,
        "gold": [set() for _ in data.queries], "doc_ids": [f"c{i}" for i in range(len(data.candidates))],
        "candidates": data.candidates, "pt_factors": fit_factors(pt, specs, data.fit, args),
        "ft_factors": fit_factors(ft, specs, data.ft_fit, args),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--workload", default=None, help="instead of a lake: a bench/workload.py preset (e.g. standard), "
                        "θ_ft its perturbed copy, factors fitted here; no gold documents, so no MRR")
    parser.add_argument("--config", default=None, help="msif.toml of the lake (default: the default world)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--inner", type=int, nargs="+", default=[1, 2, 4], help="MS-IF inner rank as multiples of the rank")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowrank.json"))
    args = parser.parse_args(argv)

    from msif_assets.engine import Damping, preconditioned_queries, score_examples, sequence_gradients
    from msif_assets.engine.lowrank import LowRankQueries, stack
    from msif_assets.engine.metrics import pearson, spearman
    from msif_assets.pipeline.factors import pad_id_of
    from msif_assets.pipeline.queries import block_vectors

    world = _bench_world(args.workload) if args.workload else _lake_world(args.lake, args.config)
    settings, pair, examples, q_examples = world["settings"], world["pair"], world["candidates"], world["queries"]
    doc_ids, gold, pt_f, ft_f = world["doc_ids"], world["gold"], world["pt_factors"], world["ft_factors"]
    grads = sequence_gradients(pair.ft.model, pair.specs, q_examples, settings.batch_size, pad_id_of(pair.ft))
    keys = settings.gradient_keys
    vectors = {k: preconditioned_queries(k.method, grads, pt_f.select(pt_f.names), ft_f.select(ft_f.names), k.damping or Damping())
               for k in keys}
    n_q = len(q_examples)

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
        for multiple in args.inner:
            lowrank_settings = replace(settings, query_rank=rank, query_inner_rank=multiple * rank, query_batch_size=0)
            started = time.perf_counter()
            truncated = block_vectors(pair.ft, pair.specs, q_examples, pt_f, ft_f, lowrank_settings)
            vector_seconds = time.perf_counter() - started
            started = time.perf_counter()
            got = score(truncated)
            seconds = time.perf_counter() - started
            stored = sum((v.left.numel() + v.right.numel()) if isinstance(v, LowRankQueries) else v.numel()
                         for v in truncated[keys[0]].values())
            for k in keys:
                if k.method != "ms-if" and multiple != args.inner[0]:
                    continue  # only MS-IF has an inner rank
                a, b = got[k].numpy(), full[k].numpy()
                per_query = [spearman(a[:, j], b[:, j]) for j in range(n_q)]
                rows.append({"method": k.method, "damping": k.damping_label, "rank": rank,
                             "inner": multiple * rank if k.method == "ms-if" else None, "pearson": pearson(a, b),
                             "spearman": spearman(a, b), "per_query_spearman": float(np.nanmean(per_query)),
                             "mrr": _mrr(got[k], doc_ids, gold), "storage": stored / dense_numel, "seconds": seconds / len(keys),
                             "vector_seconds": vector_seconds})
    print(f"{len(examples)} chunks × {n_q} queries; {len(pair.specs)} modules; storage = fraction of the dense vectors")
    print(f"{'method':<7}{'damping':<12}{'rank':>6}{'inner':>6}{'pearson':>10}{'spearman':>10}{'q-spear':>10}{'MRR':>8}{'storage':>9}")
    for r in rows:
        print(f"{r['method']:<7}{r['damping']:<12}{str(r['rank']):>6}{str(r.get('inner') or ''):>6}{r['pearson']:>10.5f}{r['spearman']:>10.5f}"
              f"{r['per_query_spearman']:>10.5f}{r['mrr']:>8.3f}{r['storage']:>9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"chunks": len(examples), "queries": n_q, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
