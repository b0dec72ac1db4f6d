"""Build the default world end to end: generate → save → tokenizer → pretrain → finetune → evaluate.

Layout under ``out_dir``::

    world/                 save_world() output (corpus shards, finetune, queries, gold, world.json)
    tokenizer/             word-level tokenizer (Hugging Face directory)
    models/pretrained/     GPT-NeoX pre-trained on world/corpus   (safetensors)
    models/finetuned/      its full fine-tune on world/finetune.jsonl
    build.json             per-step config hash, timing and metrics

Idempotent: a step runs only when its output is missing, its config hash (which chains the
hashes of the steps it depends on) differs from the one recorded in ``build.json``, or a step
before it ran in this build. Changing
only fine-tuning settings therefore re-runs fine-tuning and evaluation, never pre-training.

CLI: ``python -m msif_assets.demo.build --out DIR [--size default|tiny] [--seed N] [--force]``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from msif_assets.lake.atomic import atomic_directory, atomic_write_json
from msif_assets.demo.world import World, WorldConfig, generate_world
from msif_assets.demo.world_io import load_world, save_world

if TYPE_CHECKING:  # train pulls in torch; imported lazily where it runs
    from msif_assets.demo.train import TrainConfig

log = logging.getLogger(__name__)

MANIFEST = "build.json"
STEPS = ("world", "tokenizer", "pretrain", "finetune", "evaluate")
# Fields that never change what a step produces, so they stay out of the hashes.
_UNHASHED_TRAIN_FIELDS = {"device", "num_threads"}
_RECIPE_VERSION = 1  # bump when the code changes what a step produces for the same config


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def step_hashes(world_cfg: WorldConfig, train_cfg: "TrainConfig") -> dict[str, str]:
    """The config hash of every step; each folds in the hashes of the steps it depends on."""
    t = {k: v for k, v in train_cfg.to_dict().items() if k not in _UNHASHED_TRAIN_FIELDS}
    pre = {k: v for k, v in t.items() if not k.startswith("finetune_")}
    fin = {k: v for k, v in t.items() if k.startswith("finetune_") or k in ("seed", "warmup_fraction", "max_length",
                                                                           "attn_implementation")}
    h = {"world": _digest("world", _RECIPE_VERSION, world_cfg.to_dict())}
    h["tokenizer"] = _digest("tokenizer", _RECIPE_VERSION, h["world"], t["max_length"])
    h["pretrain"] = _digest("pretrain", _RECIPE_VERSION, h["tokenizer"], pre)
    h["finetune"] = _digest("finetune", _RECIPE_VERSION, h["pretrain"], fin)
    h["evaluate"] = _digest("evaluate", _RECIPE_VERSION, h["finetune"])
    return h


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One build per output directory at a time (a second caller waits)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        return {"steps": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; rebuilding every step", path)
        return {"steps": {}}
    return manifest if isinstance(manifest.get("steps"), dict) else {"steps": {}}


def majority_baseline(world: World) -> float:
    """Held-out accuracy of always answering each relation's most common fine-tune answer."""
    common = {}
    for relation in world.config.relations:
        answers = Counter(q.completion for q in world.finetune if q.relation == relation)
        common[relation] = answers.most_common(1)[0][0]
    return sum(common[q.relation] == q.completion for q in world.queries) / len(world.queries)


def build_default_world(out_dir: str | os.PathLike, world_cfg: WorldConfig | None = None,
                        train_cfg: "TrainConfig | None" = None, force: bool = False) -> dict:
    """Build (or reuse) the default world and its two models under ``out_dir``.

    Returns ``{"paths": {...}, "metrics": {...}, "timings": {...}, "ran": [...], "skipped": [...]}``;
    metrics include ``heldout_qa_accuracy`` (fine-tuned model on held-out queries),
    ``finetune_qa_accuracy``, ``pretrain_final_loss``, ``relative_param_distance``.
    """
    from msif_assets.demo.evaluate import evaluate_qa, relative_param_distance
    from msif_assets.demo.tokenizer import save_world_tokenizer
    from msif_assets.demo.train import TrainConfig, finetune, pretrain, read_training_record

    world_cfg = world_cfg or WorldConfig()
    train_cfg = train_cfg or TrainConfig()
    out = Path(out_dir).resolve()
    paths = {"out_dir": out, "world_dir": out / "world", "tokenizer_dir": out / "tokenizer",
             "pretrained_dir": out / "models" / "pretrained", "finetuned_dir": out / "models" / "finetuned"}
    outputs = {"world": paths["world_dir"] / "world.json", "tokenizer": paths["tokenizer_dir"] / "tokenizer.json",
               "pretrain": paths["pretrained_dir"] / "model.safetensors",
               "finetune": paths["finetuned_dir"] / "model.safetensors", "evaluate": None}
    hashes = step_hashes(world_cfg, train_cfg)
    ran, skipped = [], []
    world: World | None = None

    with _build_lock(out):
        manifest = _read_manifest(out)
        steps = manifest["steps"]

        def fresh(step: str) -> bool:
            """Current hash, output present, and nothing upstream re-ran in this build."""
            record = steps.get(step, {})
            output = outputs[step]
            return (not force and not ran and record.get("hash") == hashes[step]
                    and (output is None or output.is_file()))

        def report_skipped() -> None:  # one line for the steps reused so far (always a prefix of STEPS)
            if skipped and not ran:
                log.info("build: %s up to date in %s, reused", ", ".join(skipped), out)

        def run(step: str, body: Callable[[], dict]) -> None:
            if fresh(step):
                skipped.append(step)
                return
            report_skipped()
            log.info("build: running %s", step)
            started = time.perf_counter()
            metrics = body()
            steps[step] = {"hash": hashes[step], "seconds": round(time.perf_counter() - started, 3),
                           "metrics": metrics}
            atomic_write_json(out / MANIFEST, {"steps": steps, "world_config": world_cfg.to_dict(),
                                                "train_config": train_cfg.to_dict()})
            ran.append(step)

        def get_world() -> World:
            nonlocal world
            if world is None:
                world = load_world(paths["world_dir"])
            return world

        def do_world() -> dict:
            nonlocal world
            world = generate_world(world_cfg)
            with atomic_directory(paths["world_dir"]) as tmp:
                save_world(world, tmp)
            return {"n_documents": len(world.documents), "n_finetune_pairs": len(world.finetune),
                    "n_queries": len(world.queries), "n_gold_pairs": len(world.gold)}

        def do_tokenizer() -> dict:
            save_world_tokenizer(get_world(), paths["tokenizer_dir"], train_cfg.max_length)
            return {}

        def do_pretrain() -> dict:
            pretrain(get_world(), paths["tokenizer_dir"], paths["pretrained_dir"], train_cfg)
            rec = read_training_record(paths["pretrained_dir"])
            return {"pretrain_final_loss": rec["epoch_losses"][-1], "pretrain_tokens": rec["tokens_seen"]}

        def do_finetune() -> dict:
            finetune(paths["pretrained_dir"], get_world(), paths["finetuned_dir"], train_cfg)
            rec = read_training_record(paths["finetuned_dir"])
            return {"finetune_final_loss": rec["epoch_losses"][-1]}

        def do_evaluate() -> dict:
            w, dev, threads = get_world(), train_cfg.device, train_cfg.num_threads
            return {
                "heldout_qa_accuracy": evaluate_qa(paths["finetuned_dir"], w.queries, dev, threads),
                "finetune_qa_accuracy": evaluate_qa(paths["finetuned_dir"], w.finetune, dev, threads),
                "pretrained_heldout_qa_accuracy": evaluate_qa(paths["pretrained_dir"], w.queries, dev, threads),
                "majority_baseline_heldout_accuracy": majority_baseline(w),
                "relative_param_distance": relative_param_distance(paths["pretrained_dir"], paths["finetuned_dir"]),
            }

        for step, body in zip(STEPS, (do_world, do_tokenizer, do_pretrain, do_finetune, do_evaluate)):
            run(step, body)
        if not ran:
            report_skipped()

    metrics: dict = {}
    for step in STEPS:
        metrics.update(steps[step].get("metrics", {}))
    timings = {f"{step}_s": steps[step]["seconds"] for step in STEPS}
    timings["total_s"] = round(sum(timings.values()), 3)
    return {"paths": {k: str(v) for k, v in paths.items()}, "metrics": metrics, "timings": timings,
            "hashes": hashes, "ran": ran, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    from msif_assets.demo.settings import SIZES, demo_size

    parser = argparse.ArgumentParser(prog="python -m msif_assets.demo.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created if needed)")
    parser.add_argument("--size", default="default", choices=sorted(SIZES), help="named world/model size")
    parser.add_argument("--seed", type=int, default=None, help="seed for both the world and the trainings")
    parser.add_argument("--force", action="store_true", help="re-run every step even if up to date")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    size = demo_size(args.size)
    world_cfg, train_cfg = size.world, size.train
    if args.seed is not None:
        world_cfg, train_cfg = replace(world_cfg, seed=args.seed), replace(train_cfg, seed=args.seed)
    result = build_default_world(args.out, world_cfg, train_cfg, force=args.force)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
