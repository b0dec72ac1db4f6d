"""Scale benchmark: phase times and peak memory on Pythia-shaped models as queries and
candidates grow, the growth slopes, and a memory projection to 1B and 7B.

Every measured case runs in a fresh process, so its peak RSS (``VmHWM``) is its own:

* ``factors``: both factor sets (θ_pt on ``--fit`` sequences, θ_ft on half as many) through
  the pipeline's file path — covariance pass, eigenbasis written module by module, Λ pass over
  the lazily read eigenbasis, factors written module by module;
* ``queries Q``: query gradients in token form, preconditioned low-rank for MS-IF, SS-IF and
  GDP at ``--rank``, ``--block`` queries at a time, factors read one module at a time;
* ``scoring N``: ``N`` candidates against the stored vectors of ``--scored-queries`` queries
  (all keys, block by block);
* ``eigh d``: one float64 eigendecomposition of a d×d covariance (the large-module cost).

    python -m bench.scale                                   # CPU default (see bench/README.md)
    python -m bench.scale --models pythia-410m --queries 8 32 --candidates 64
    python -m bench.scale --quick                            # smoke run, tiny shape

Writes bench/results/scale.json (every case, the slopes, the projection).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .workload import Workload

SHAPES: dict[str, Workload] = {  # GPT-NeoX shapes of the Pythia suite, vocab 50304, random init
    "pythia-70m": Workload(name="pythia-70m", layers=6, hidden=512, heads=8, mlp=2048, vocab=50304),
    "pythia-160m": Workload(name="pythia-160m", layers=12, hidden=768, heads=12, mlp=3072, vocab=50304),
    "pythia-410m": Workload(name="pythia-410m", layers=24, hidden=1024, heads=16, mlp=4096, vocab=50304),
    "pythia-1b": Workload(name="pythia-1b", layers=16, hidden=2048, heads=8, mlp=8192, vocab=50304),
    "pythia-6.9b": Workload(name="pythia-6.9b", layers=32, hidden=4096, heads=32, mlp=16384, vocab=50304),
    "tiny": Workload(name="tiny", layers=2, hidden=64, heads=4, mlp=256, vocab=512),
}
SEQ_LEN, PROMPT, COMPLETION = 64, 16, 8


def _workload(shape: str, args: argparse.Namespace, n_queries: int = 1, n_candidates: int = 1) -> Workload:
    return replace(SHAPES[shape], seq_len=args.seq_len, n_fit=args.fit, n_ft_fit=max(args.fit // 2, 1), n_queries=n_queries,
                   n_candidates=n_candidates, prompt_len=PROMPT, completion_len=COMPLETION, batch_size=args.batch_size)


# -- workers (one per measured case, in their own process) ----------------------------------


def _settings(args: dict):
    from msif_assets.engine import Damping
    from msif_assets.pipeline.settings import ComputeSettings

    return ComputeSettings(methods=("ms-if", "ss-if", "gdp"), dampings=(Damping("relative", 0.1),), query_rank=args["rank"],
                           query_batch_size=args["block"], batch_size=args["batch_size"])


def _models(w: Workload):
    from .workload import build_model, perturbed_copy
    from msif_assets.engine import discover_modules

    pt = build_model(w)
    ft = perturbed_copy(pt, w.ft_perturbation, seed=w.seed + 1)
    return pt, ft, discover_modules(pt)


def _fit_and_save(model, specs, examples, folder: Path, args, phases: dict, label: str) -> None:
    """The pipeline's factor path for one model: covariance sums → eigenbasis file (module by
    module, the sums then freed) → Λ pass over the lazily read eigenbasis → factor file (module by module)."""
    from msif_assets.engine import CovarianceStats, FactorArgs, LambdaStats, fit_covariance, fit_lambdas, factor_metadata
    from msif_assets.pipeline.factors import load_eigenbasis, write_eigenbasis, write_factors

    fargs = FactorArgs(batch_size=args["batch_size"])
    started = time.perf_counter()
    cov = fit_covariance(model, specs, examples, fargs)
    phases[f"{label} covariance"] = time.perf_counter() - started
    started = time.perf_counter()
    eigenbasis = folder / f"{label}.eigenbasis.safetensors"
    write_eigenbasis(eigenbasis, [cov.a_sums], [cov.s_sums], cov.token_count, specs, True, {})
    tokens = cov.token_count
    del cov
    phases[f"{label} eigendecomposition"] = time.perf_counter() - started
    started = time.perf_counter()
    basis = load_eigenbasis(eigenbasis)
    lam = fit_lambdas(model, specs, basis, examples, fargs)
    phases[f"{label} lambda"] = time.perf_counter() - started
    meta = factor_metadata(specs, fargs, CovarianceStats({}, {}, tokens), LambdaStats({}, lam.sequence_count))
    write_factors(folder / f"{label}.safetensors", specs, basis, [lam.sums], lam.sequence_count, meta)


def _worker_factors(args: dict) -> dict:
    from .workload import build_data

    w = Workload(**args["workload"])
    pt, ft, specs = _models(w)
    data = build_data(w)
    phases: dict[str, float] = {}
    folder = Path(args["dir"])
    _fit_and_save(pt, specs, data.fit, folder, args, phases, "pt")
    _fit_and_save(ft, specs, data.ft_fit, folder, args, phases, "ft")
    return {"phases": phases, "factor_file_mb": sum((folder / f).stat().st_size for f in ("pt.safetensors", "ft.safetensors")) / 2**20}


def _worker_queries(args: dict) -> dict:
    from types import SimpleNamespace

    from msif_assets.lake.factor_store import save_tensors
    from msif_assets.pipeline.factors import load_factors
    from msif_assets.pipeline.queries import block_vectors
    from .workload import build_data

    w = Workload(**args["workload"])
    _, ft, specs = _models(w)
    queries = build_data(w).queries
    settings = _settings(args)
    folder = Path(args["dir"])
    pt_f, ft_f = load_factors(folder / "pt.safetensors"), load_factors(folder / "ft.safetensors")
    loaded = SimpleNamespace(model=ft, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=2))
    out = folder / f"q{len(queries)}"
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    for block, start in enumerate(range(0, len(queries), settings.query_batch_size)):
        vectors = block_vectors(loaded, specs, queries[start : start + settings.query_batch_size], pt_f, ft_f, settings)
        tensors = {}
        for key, by_module in vectors.items():
            for name, v in by_module.items():
                if hasattr(v, "left"):
                    tensors[f"{key.tag}/{key.method}/{name}::left"], tensors[f"{key.tag}/{key.method}/{name}::right"] = v.left, v.right
                else:
                    tensors[f"{key.tag}/{key.method}/{name}"] = v
        save_tensors(out / f"block={block}.safetensors", tensors)
        del vectors, tensors
    return {"phases": {"query gradients": time.perf_counter() - started},
            "vector_mb": sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20}


def _worker_scoring(args: dict) -> dict:
    from msif_assets.engine import lowrank, score_examples
    from msif_assets.engine.lowrank import LowRankQueries
    from msif_assets.lake.factor_store import load_tensors
    from .workload import build_data

    w = Workload(**args["workload"])
    pt, _, specs = _models(w)
    candidates = build_data(w).candidates
    folder = Path(args["dir"]) / f"q{args['scored_queries']}"
    started = time.perf_counter()
    for path in sorted(folder.glob("block=*.safetensors")):  # one block's vectors in memory at a time
        tensors, _ = load_tensors(path)
        keys = sorted({name.rsplit("/", 1)[0] for name in tensors})
        vectors = {}
        for spec in specs:
            parts = []
            for key in keys:
                base = f"{key}/{spec.name}"
                parts.append(LowRankQueries(tensors[f"{base}::left"], tensors[f"{base}::right"]) if f"{base}::left" in tensors else tensors[base])
            vectors[spec.name] = lowrank.stack(parts)
        for start in range(0, len(candidates), 512):
            score_examples(pt, specs, vectors, candidates[start : start + 512], args["batch_size"])
        del tensors, vectors
    return {"phases": {"scoring": time.perf_counter() - started}}


def _worker_eigh(args: dict) -> dict:
    d = args["dim"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(d, d + 16, generator=generator, dtype=torch.float64)
    covariance = x @ x.T / d
    del x
    started = time.perf_counter()
    torch.linalg.eigh(covariance)
    return {"phases": {"eigh": time.perf_counter() - started}, "matrix_mb": d * d * 8 / 2**20}


def _worker_kronfluence(args: dict) -> dict:
    """kronfluence 1.0.1 on the same θ_pt, fit sequences, queries and candidates: its EK-FAC
    factors and SS-IF pairwise scores (it has no MS-IF), dense query gradients unless ``kron_rank``."""
    from msif_assets.engine import discover_modules
    from .kron import run_kronfluence
    from .measure import Meter
    from .workload import build_data, build_model

    w = Workload(**args["workload"])
    model = build_model(w)
    result = run_kronfluence(Meter(torch.device("cpu")), w, model, discover_modules(model), build_data(w), query_rank=args["kron_rank"])
    if result.error:
        raise RuntimeError(result.error)
    return {"phases": {p.name: p.seconds for p in result.phases}, "phase_peak_mb": {p.name: p.peak_mb for p in result.phases}}


WORKERS = {"factors": _worker_factors, "queries": _worker_queries, "scoring": _worker_scoring, "eigh": _worker_eigh,
           "kronfluence": _worker_kronfluence}


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run_worker(kind: str, args: dict, module: str = "bench.scale") -> dict:
    """Run ``module --worker`` on ``{kind, **args}`` in a fresh process; its last stdout line is the result."""
    payload = json.dumps({"kind": kind, **args})
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, "--worker", payload], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


# -- the driver ----------------------------------------------------------------------------


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) on log(x): 1 = linear growth, 0 = flat."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else None


def tracked_shapes(w: Workload) -> list[tuple[int, int]]:
    """(d_out, d_in incl. bias) of every tracked linear of a GPT-NeoX layer stack."""
    h, f = w.hidden, w.mlp
    return [(3 * h, h + 1), (h, h + 1), (f, h + 1), (h, f + 1)] * w.layers


def projection(w: Workload, rank: int, block: int, n_keys: int) -> dict:
    """Memory of each phase from the shapes alone (the model's weights in float32 excluded):
    factor file per model (float64 Q_A, Q_S, Λ), the covariance pass's float64 sums, one
    query block (token-form gradients of T tokens + every key's rank-r vectors) and the
    largest module's eigendecomposition (matrix + eigenvectors)."""
    shapes = tracked_shapes(w)
    tokens = PROMPT + COMPLETION + 1
    params = sum(m * n for m, n in shapes)
    return {
        "tracked_params_m": params / 1e6,
        "weights_fp32_gb": (params + 2 * w.vocab * w.hidden) * 4 / 2**30,
        "factor_file_gb": sum(n * n + m * m + m * n for m, n in shapes) * 8 / 2**30,
        "covariance_sums_gb": sum(n * n + m * m for m, n in shapes) * 8 / 2**30,
        "largest_eigh_gb": 2 * max(max(m, n) for m, n in shapes) ** 2 * 8 / 2**30,
        "query_block_gb": block * (tokens * sum(m + n for m, n in shapes) + n_keys * rank * sum(m + n for m, n in shapes)) * 4 / 2**30,
        "dense_query_vectors_per_query_gb": n_keys * params * 4 / 2**30,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=None, help="shapes to run (default: pythia-70m pythia-160m; CUDA adds pythia-410m)")
    parser.add_argument("--queries", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--candidates", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--scored-queries", type=int, default=None, help="queries scored against the candidates (default: the fewest of --queries)")
    parser.add_argument("--eigh", type=int, nargs="*", default=[1024, 2048, 4096, 8192], help="module sizes d for the eigh cost")
    parser.add_argument("--fit", type=int, default=256, help="sequences fitting θ_pt's factors (θ_ft: half)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--block", type=int, default=32, help="query_batch_size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kronfluence", action="store_true", help="also run kronfluence 1.0.1 (bench extra) on θ_pt: its factors and "
                        "SS-IF scores of --scored-queries queries against the fewest --candidates, in its own process")
    parser.add_argument("--kron-rank", type=int, default=None, help="kronfluence's query_gradient_low_rank (default: dense)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, small sizes: a smoke run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        result = WORKERS[spec["kind"]](spec)
        result["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(result))
        return 0
    if args.quick:
        args.models, args.queries, args.candidates, args.eigh, args.fit = ["tiny"], [2, 4], [8, 16], [64], 8
    cuda = torch.cuda.is_available()
    models = args.models or (["pythia-70m", "pythia-160m", "pythia-410m"] if cuda else ["pythia-70m", "pythia-160m"])
    if cuda and not args.quick:  # a GPU takes more of everything in the same time
        args.queries, args.candidates, args.fit = [q * 4 for q in args.queries], [n * 8 for n in args.candidates], args.fit * 8

    results = {"machine": _machine(), "settings": {k: v for k, v in vars(args).items() if k != "worker"}, "models": {}, "eigh": []}
    base = {"rank": args.rank, "block": args.block, "batch_size": args.batch_size}
    for shape in models:
        with tempfile.TemporaryDirectory(prefix=f"msif-scale-{shape}-") as folder:
            rows = results["models"].setdefault(shape, {"cases": [], "projection": projection(SHAPES[shape], args.rank, args.block, 3)})
            print(f"== {shape}: factors on {args.fit} + {max(args.fit // 2, 1)} sequences of {args.seq_len} tokens", flush=True)
            rows["cases"].append({"case": "factors", **_run_worker("factors", {**base, "dir": folder, "workload": _workload(shape, args).to_dict()})})
            _print_case(rows["cases"][-1])
            for q in args.queries:
                w = _workload(shape, args, n_queries=q)
                rows["cases"].append({"case": "queries", "n": q, **_run_worker("queries", {**base, "dir": folder, "workload": w.to_dict()})})
                _print_case(rows["cases"][-1])
            scored = args.scored_queries or min(args.queries)
            for n in args.candidates:
                w = _workload(shape, args, n_queries=scored, n_candidates=n)
                rows["cases"].append({"case": "scoring", "n": n, "queries": scored,
                                      **_run_worker("scoring", {**base, "dir": folder, "scored_queries": scored, "workload": w.to_dict()})})
                _print_case(rows["cases"][-1])
            if args.kronfluence:
                w = _workload(shape, args, n_queries=scored, n_candidates=min(args.candidates))
                label = f"kronfluence ({scored} q, {'dense' if args.kron_rank is None else f'rank {args.kron_rank}'})"
                rows["cases"].append({"case": label, "n": w.n_candidates,
                                      **_run_worker("kronfluence", {"kron_rank": args.kron_rank, "workload": w.to_dict()})})
                _print_case(rows["cases"][-1])
            rows["slopes"] = _slopes(rows["cases"], args.block)
    for d in args.eigh:
        results["eigh"].append({"dim": d, **_run_worker("eigh", {"dim": d})})
        _print_case({"case": "eigh", "n": d, **results["eigh"][-1]})
    print(render(results))
    write_results(args.out, results)
    return 0


def write_results(path: str | Path, results: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def _slopes(cases: list[dict], block: int) -> dict:
    """Growth exponents; peak memory against the number of queries counts only runs of at least
    one full block (below that, a bigger run is a bigger block, which the setting allows)."""
    def series(kind: str, value, smallest: int = 0) -> list[tuple[float, float]]:
        return [(c["n"], value(c)) for c in cases if c["case"] == kind and c["n"] >= smallest]

    phase = lambda c: sum(c["phases"].values())  # noqa: E731
    return {
        "query_time_vs_queries": _slope(series("queries", phase)),
        "query_peak_rss_vs_queries": _slope(series("queries", lambda c: c["peak_rss_mb"], block)),
        "scoring_time_vs_candidates": _slope(series("scoring", phase)),
        "scoring_peak_rss_vs_candidates": _slope(series("scoring", lambda c: c["peak_rss_mb"])),
    }


def _print_case(c: dict) -> None:
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in c["phases"].items())
    print(f"  {c['case']:<8} {c.get('n', ''):>5}  peak RSS {c['peak_rss_mb']:8.0f} MB  ({phases})", flush=True)


def render(results: dict) -> str:
    lines = ["| model | case | n | seconds | peak RSS MB |", "|---|---|---:|---:|---:|"]
    for shape, rows in results["models"].items():
        for c in rows["cases"]:
            lines.append(f"| {shape} | {c['case']} | {c.get('n', '')} | {sum(c['phases'].values()):.1f} | {c['peak_rss_mb']:.0f} |")
    lines += ["", "Growth exponents (slope of log cost on log size; 1 = linear, 0 = flat; RSS vs queries over runs of ≥ 1 block):",
              "| model | time vs queries | RSS vs queries | time vs candidates | RSS vs candidates |", "|---|---:|---:|---:|---:|"]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for shape, rows in results["models"].items():
        s = rows["slopes"]
        lines.append(f"| {shape} | {fmt(s['query_time_vs_queries'])} | {fmt(s['query_peak_rss_vs_queries'])} | "
                     f"{fmt(s['scoring_time_vs_candidates'])} | {fmt(s['scoring_peak_rss_vs_candidates'])} |")
    if results["eigh"]:
        lines += ["", "| module size d | eigh seconds | matrix MB | peak RSS MB |", "|---:|---:|---:|---:|"]
        lines += [f"| {e['dim']} | {e['phases']['eigh']:.2f} | {e['matrix_mb']:.0f} | {e['peak_rss_mb']:.0f} |" for e in results["eigh"]]
    settings = results["settings"]
    lines += ["", f"Projection (rank {settings['rank']}, block {settings['block']}, 3 keys; GB):",
              "| model | tracked params (M) | weights fp32 | factor file / model | covariance sums | largest eigh | query block | dense vectors / query |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in ("pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-6.9b"):
        p = projection(SHAPES[shape], settings["rank"], settings["block"], 3)
        lines.append(f"| {shape} | {p['tracked_params_m']:.0f} | {p['weights_fp32_gb']:.1f} | {p['factor_file_gb']:.1f} | "
                     f"{p['covariance_sums_gb']:.1f} | {p['largest_eigh_gb']:.2f} | {p['query_block_gb']:.2f} | "
                     f"{p['dense_query_vectors_per_query_gb']:.1f} |")
    return "\n".join(lines)


def _machine() -> dict:
    from .measure import machine_info

    return machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
