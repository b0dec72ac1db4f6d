"""The default world's training recipe for the counterfactual evaluation: pre-train from scratch
on the given documents and fine-tune, exactly as ``demo/build.py`` made the lake's two models
(``demo/train.py``: same ``TrainConfig`` of the world's size, schedule and fine-tuning data).

Recipe contract (``pipeline/retrain.py``): ``retrain(corpus_docs, out_dir, seed, **options)``
returns the fine-tuned model directory under ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from .train import TrainConfig

_SOURCES = ("train.py", "sequences.py", "recipe.py", "device.py")


def train_config(size: str = "default", train: Mapping[str, Any] | None = None, seed: int = 0) -> "TrainConfig":
    """The world size's ``TrainConfig`` with ``train`` overrides (TrainConfig fields) and ``seed``."""
    from .settings import demo_size
    from .train import TrainConfig

    return TrainConfig.from_dict({**demo_size(size).train.to_dict(), **dict(train or {}), "seed": seed})


def retrain(corpus_docs: Sequence[dict[str, Any]], out_dir: Path, seed: int, *, demo_dir: str, size: str = "default",
            train: Mapping[str, Any] | None = None) -> Path:
    """Pre-train ``out_dir/pretrained`` on ``corpus_docs`` (a subset of the world's corpus, in the
    world's document order) with the world size's ``TrainConfig`` (``train``: overrides of its
    fields, for a world built with another config) and ``seed``, then fine-tune
    ``out_dir/finetuned`` on the world's fine-tuning pairs; return the latter."""
    from .train import finetune, pretrain
    from .world_io import load_world

    root = Path(demo_dir)
    world = load_world(root / "world")
    by_id = {d.doc_id: d for d in world.documents}
    unknown = [d["doc_id"] for d in corpus_docs if d["doc_id"] not in by_id]
    changed = [d["doc_id"] for d in corpus_docs if d["doc_id"] in by_id and by_id[d["doc_id"]].text != d["text"]]
    if unknown or changed:
        raise ValueError(f"demo recipe: documents not in the world at {root / 'world'} "
                         f"(unknown {unknown[:5]}, text changed {changed[:5]}); the recipe trains the default world only")
    keep = {d["doc_id"] for d in corpus_docs}
    subset = replace(world, documents=tuple(d for d in world.documents if d.doc_id in keep))
    cfg = train_config(size, train, seed)
    out = Path(out_dir)
    pretrain(subset, root / "tokenizer", out / "pretrained", cfg)
    return finetune(out / "pretrained", subset, out / "finetuned", cfg)


def _version(*, demo_dir: str, size: str = "default", train: Mapping[str, Any] | None = None) -> str:
    """What a retrain depends on besides its documents and seed: the world (world.json and its
    fine-tuning pairs), the tokenizer, the training config (seed excluded) and the training code."""
    cfg = {k: v for k, v in train_config(size, train).to_dict().items() if k not in ("seed", "device", "num_threads")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    here, world = Path(__file__).parent, Path(demo_dir)
    for path in (*(here / name for name in _SOURCES), world / "world" / "world.json",
                 world / "world" / "finetune.jsonl", world / "tokenizer" / "tokenizer.json"):
        h.update(path.read_bytes() if path.is_file() else b"-")
    return h.hexdigest()[:16]


retrain.version = _version  # type: ignore[attr-defined]
