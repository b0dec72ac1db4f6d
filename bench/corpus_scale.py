"""What grows with the corpus: embedding the chunks, the LanceDB table and the KNN candidates.

With KNN candidates, scoring runs each query block against its own queries' k nearest chunks,
so its cost is set by queries × ``knn_k``, not by the corpus. This benchmark measures the steps
that do see every chunk (sentence-transformer embedding, the LanceDB write, the KNN search) at
growing corpus sizes, each size in a fresh process so its peak RSS is its own, and counts the
candidates that scoring would run. Synthetic word-like text, deterministic per size.

    python -m bench.corpus_scale --chunks 1000 10000 --queries 64 --knn-k 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from .scale import _machine, _peak_rss_mb, _run_worker, _slope, write_results

WORDS_PER_CHUNK = 48  # about 64 GPT-NeoX tokens, the scale benchmark's sequence length


def synthetic_texts(n: int, seed: int, vocabulary: int = 3000) -> list[str]:
    """``n`` texts of WORDS_PER_CHUNK word-like tokens drawn (Zipf-like) from a fixed vocabulary."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "da", "pe", "qu", "ri", "so", "tu", "wa"]
    words = ["".join(random.Random(i).choices(syllables, k=2 + i % 3)) for i in range(vocabulary)]
    weights = [1.0 / (i + 1) for i in range(vocabulary)]
    return [" ".join(rng.choices(words, weights, k=WORDS_PER_CHUNK)) for _ in range(n)]


def _worker(args: dict) -> dict:
    import numpy as np
    import pyarrow as pa

    from msif_assets.lake.embeddings import encode_texts, load_sentence_encoder
    from msif_assets.lake.vectors import ChunkVectorStore, with_vectors

    n, phases = args["chunks"], {}
    texts = synthetic_texts(n, seed=0)
    queries = synthetic_texts(args["queries"], seed=1)
    encoder = load_sentence_encoder()
    started = time.perf_counter()
    vectors = encode_texts(encoder, texts)
    phases["embed chunks"] = time.perf_counter() - started
    ids = [f"c{i:07d}" for i in range(n)]
    table = with_vectors(pa.table({"shard": ["s0"] * n, "chunk_id": ids, "doc_id": ids, "text": texts}), vectors)
    with tempfile.TemporaryDirectory(prefix="msif-corpus-") as folder:
        store = ChunkVectorStore(Path(folder) / "embeddings")
        started = time.perf_counter()
        store.replace_shard("s0", table)
        phases["lancedb write"] = time.perf_counter() - started
        started = time.perf_counter()
        hits = store.knn(np.asarray(encode_texts(encoder, queries)), args["knn_k"], shards=["s0"])
        phases["knn (embed queries + search)"] = time.perf_counter() - started
    chunk_ids = hits.column("chunk_id").to_pylist()
    return {"phases": phases, "candidate_pairs": len(chunk_ids), "distinct_candidates": len(set(chunk_ids))}


def render(results: dict) -> str:
    lines = ["| chunks | embed s | LanceDB write s | KNN s | scored pairs | distinct candidates | peak RSS MB |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["cases"]:
        p = c["phases"]
        lines.append(f"| {c['chunks']} | {p['embed chunks']:.1f} | {p['lancedb write']:.2f} | {p['knn (embed queries + search)']:.2f} | "
                     f"{c['candidate_pairs']} | {c['distinct_candidates']} | {c['peak_rss_mb']:.0f} |")
    slopes = results["slopes"]
    lines.append("")
    lines.append("Growth exponents against the corpus size (1 = linear, 0 = flat): "
                 + ", ".join(f"{k} {'—' if v is None else f'{v:.2f}'}" for k, v in slopes.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1000, 10000], help="corpus sizes, in chunks")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--knn-k", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "corpus_scale.json"))
    args = parser.parse_args(argv)
    if args.worker:
        result = _worker(json.loads(args.worker))
        result["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(result))
        return 0
    results = {"machine": _machine(), "settings": {k: v for k, v in vars(args).items() if k != "worker"}, "cases": []}
    for n in args.chunks:
        case = {"chunks": n, **_run_worker("corpus", {"chunks": n, "queries": args.queries, "knn_k": args.knn_k}, module="bench.corpus_scale")}
        results["cases"].append(case)
        print(f"  {n:>8} chunks  peak RSS {case['peak_rss_mb']:8.0f} MB  " + ", ".join(f"{k} {v:.2f}s" for k, v in case["phases"].items()), flush=True)
    cases = results["cases"]
    results["slopes"] = {
        "embed time": _slope([(c["chunks"], c["phases"]["embed chunks"]) for c in cases]),
        "KNN time": _slope([(c["chunks"], c["phases"]["knn (embed queries + search)"]) for c in cases]),
        "peak RSS": _slope([(c["chunks"], c["peak_rss_mb"]) for c in cases]),
        "scored pairs": _slope([(c["chunks"], c["candidate_pairs"]) for c in cases]),
    }
    print(render(results))
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
