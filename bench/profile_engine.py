"""Where does the engine's time go? torch.profiler over each traversal on a slice of the workload.

    python bench/profile_engine.py [--workload standard] [--sequences 64] [--out bench/results/profile.txt]

Each collector's ``collect`` is wrapped (here, not in the engine) in a ``record_function`` range,
so the report splits every phase into: the model's forward/backward, the collector's own
contractions, and the traversal hook's ``a`` preparation (bias-column concat, pad mask). The op
table is grouped by input shape, which names the GEMMs (e.g. ``[[257, 2048], [2048, 257]]`` is
the A covariance of a 256-wide module with its bias column).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench.floor import forward_backward  # noqa: E402
from bench.workload import PRESETS, build_data, build_model  # noqa: E402
from msif_assets.engine import (  # noqa: E402
    Damping,
    FactorArgs,
    discover_modules,
    eigendecompose,
    fit_covariance,
    fit_lambdas,
    preconditioned_queries,
    score_examples,
    sequence_gradients,
    assemble_factors,
    factor_metadata,
)
from msif_assets.engine import collectors as C  # noqa: E402


def _wrap_collectors() -> None:
    for cls in (C.CovarianceCollector, C.LambdaCollector, C.GradientCollector, C.ScoreCollector):
        original = cls.collect
        if getattr(original, "_profiled", False):
            continue

        @functools.wraps(original)
        def collect(self, spec, a, s, _original=original, _label=f"collector:{cls.__name__}"):
            with record_function(_label):
                return _original(self, spec, a, s)

        collect._profiled = True
        cls.collect = collect


def _summarise(prof, label: str, seconds: float) -> str:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    collector = sum(e.cpu_time_total for e in events if e.key.startswith("collector:")) / 1e6
    by_shape = prof.key_averages(group_by_input_shape=True)
    lines = [f"## {label}: {seconds:.2f} s wall, {total:.2f} s profiled CPU; inside collectors {collector:.2f} s "
             f"({100 * collector / max(total, 1e-9):.0f}%)"]
    lines.append(by_shape.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40,
                                max_shapes_column_width=70))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(PRESETS), default="standard")
    parser.add_argument("--sequences", type=int, default=64, help="fitting sequences and candidates to profile")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile.txt"))
    args = parser.parse_args(argv)
    w = PRESETS[args.workload]
    w = replace(w, n_fit=args.sequences, n_candidates=args.sequences, n_ft_fit=1,
                batch_size=args.batch_size or w.batch_size)
    model, data = build_model(w), build_data(w)
    specs = discover_modules(model, "all")
    fargs = FactorArgs(labels="sampled", seed=0, split_heads=False, batch_size=w.batch_size)
    _wrap_collectors()
    forward_backward(model, data.fit[: w.batch_size], w.batch_size)  # warm-up

    cov = fit_covariance(model, specs, data.fit[: w.batch_size], fargs)
    basis = eigendecompose(cov, specs, False)
    lam = fit_lambdas(model, specs, basis, data.fit[: w.batch_size], fargs)
    factors = assemble_factors(specs, basis, lam, factor_metadata(specs, fargs, cov, lam))
    grads = sequence_gradients(model, specs, data.queries, batch_size=w.batch_size)
    vectors = preconditioned_queries("ss-if", grads, None, factors, Damping("absolute", w.damping))

    runs = {
        "floor (fwd+bwd, parameter grads)": lambda: forward_backward(model, data.fit, w.batch_size),
        "covariance": lambda: fit_covariance(model, specs, data.fit, fargs),
        "lambda": lambda: fit_lambdas(model, specs, basis, data.fit, fargs),
        "pairwise scoring": lambda: score_examples(model, specs, vectors, data.candidates, batch_size=w.batch_size),
    }
    report = [f"# engine profile: workload {w.name!r}, {args.sequences} sequences x {w.seq_len} tokens, "
              f"batch {w.batch_size}, {torch.get_num_threads()} threads, load {os.getloadavg()}"]
    for label, fn in runs.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            started = time.perf_counter()
            fn()
            seconds = time.perf_counter() - started
        report.append(_summarise(prof, label, seconds))
    text = "\n\n".join(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
