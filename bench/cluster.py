"""Celery workers against the in-process runner: wall time of one full ``msif materialize`` of
the same user-brought world, in process and with ``--executor celery`` on 1 and on 2 workers
(each listening on both queues, one step at a time, one torch thread). Prints a table and
writes JSON.

    python -m bench.cluster [--shards 4] [--docs 384] [--queries 16] [--out bench/results/cluster.json]

Redis (``redis-server`` on PATH) and the workers are started here and stopped at the end; their
start-up is not timed. Every case materializes a fresh lake with a fresh Dagster instance. The
world is ``bench.lineage_scale``'s at the ``tiny`` shape (GPT-NeoX 2×64): small enough that
Dagster's and Celery's per-step costs are a visible part of the time, as the table shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOME_YAML = "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: {slots}\n    granularity: op\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("redis-server did not start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MSIF_CONFIG", "MSIF_LAKE", "MSIF_EXECUTOR")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("MSIF_FIDELITY", "small")
    return {**env, **extra}


def _home(path: Path, slots: int) -> Path:
    path.mkdir(parents=True)
    (path / "dagster.yaml").write_text(HOME_YAML.format(slots=slots))
    return path


def _materialize(config: Path, lake: Path, env: dict[str, str], *extra: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "msif_assets.app.cli", "materialize", "--config", str(config),
                           "--lake", str(lake), *extra], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"msif materialize {' '.join(extra)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return seconds


def _workers(names: list[str], broker: str, home: Path, logs: Path) -> list[subprocess.Popen]:
    from msif_assets.app.cluster import worker_command
    from msif_assets.defs.executors import CelerySettings

    procs = []
    for name in names:
        argv, env = worker_command(CelerySettings(broker=broker), name=name, environ=_env(DAGSTER_HOME=str(home)))
        log = logs / f"{name}.log"
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 300
    for name, proc in zip(names, procs):
        while b" ready." not in (logs / f"{name}.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker {name} did not start: {(logs / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.2)
    return procs


def _steps_per_worker(home: Path) -> dict[str, int]:
    import dagster as dg

    from msif_assets.app.cluster import steps_by_worker

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = [r.run_id for r in instance.get_runs() if r.tags.get("msif/executor") == "celery"]
        return {w: len(steps) for w, steps in sorted(steps_by_worker(instance, runs).items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--docs", type=int, default=384)
    parser.add_argument("--doc-words", type=int, default=40)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default: 1 2)")
    parser.add_argument("--root", default=None, help="working directory (default: a temporary one, removed after)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    args = parser.parse_args(argv)

    from bench.lineage_scale import build

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="msif-bench-cluster-"))
    root.mkdir(parents=True, exist_ok=True)
    config = build(root / "world", "tiny", args.docs, args.doc_words, args.queries, args.shards, "float32",
                   {"batch_size": 8, "knn_k": 4, "dampings": ["rel:0.1"]})
    rows = []
    try:
        seconds = _materialize(config, root / "lake-local", _env(DAGSTER_HOME=str(_home(root / "home-local", 1))))
        rows.append({"executor": "in-process (default)", "workers": 0, "seconds": round(seconds, 1), "steps_per_worker": {}})
        print(f"in-process: {seconds:.1f}s", flush=True)
        redis, broker = _start_redis(root)
        try:
            for n in args.workers:
                home = _home(root / f"home-celery-{n}", n)  # one msif_heavy slot per GPU worker
                workers = _workers([f"w{i + 1}" for i in range(n)], broker, home, root)
                try:
                    seconds = _materialize(config, root / f"lake-celery-{n}", _env(DAGSTER_HOME=str(home), MSIF_CELERY_BROKER=broker),
                                           "--executor", "celery")
                finally:
                    for proc in workers:
                        _stop(proc)
                rows.append({"executor": "celery", "workers": n, "seconds": round(seconds, 1), "steps_per_worker": _steps_per_worker(home)})
                print(f"celery, {n} worker(s): {seconds:.1f}s", flush=True)
        finally:
            _stop(redis)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    base = next((r["seconds"] for r in rows if r["executor"] == "celery" and r["workers"] == 1), None)
    print(f"\nmsif materialize, {args.shards} shards × {args.docs // args.shards} docs, {args.queries} queries, GPT-NeoX 2×64 "
          f"({os.cpu_count()} CPUs)\n")
    print(f"| {'executor':<22} | {'workers':>7} | {'wall s':>7} | {'vs 1 worker':>11} | steps per worker |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 9}|{'-' * 13}|------------------|")
    for r in rows:
        ratio = f"{base / r['seconds']:.2f}×" if base and r["executor"] == "celery" else ""
        spread = ", ".join(f"{w.split('@')[0]} {n}" for w, n in r["steps_per_worker"].items())
        print(f"| {r['executor']:<22} | {r['workers']:>7} | {r['seconds']:>7.1f} | {ratio:>11} | {spread} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"world": {"shards": args.shards, "docs": args.docs, "doc_words": args.doc_words, "queries": args.queries,
                                         "shape": "tiny"},
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
