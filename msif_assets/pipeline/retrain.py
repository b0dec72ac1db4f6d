"""Retraining for the counterfactual evaluation: the recipe hook, a content-addressed model
cache, and the measurement of a retrained model on the lake's queries.

**The recipe hook.** A world is retrained by a Python function named ``module:function``
(``[counterfactual] recipe`` in msif.toml; the default world ships
``msif_assets.demo.recipe:retrain``)::

    def retrain(corpus_docs: list[dict], out_dir: pathlib.Path, seed: int, **recipe_options) -> str | Path

``corpus_docs`` are the documents to pre-train on (``doc_id``, ``text``, ``shard``, in lake
order); the function pre-trains from scratch, fine-tunes the result exactly as the original
fine-tune was made (same data, schedule and ``seed``), writes anything it likes under
``out_dir`` and returns the fine-tuned Hugging Face model directory (full weights, inside
``out_dir``). An optional attribute ``retrain.version`` (a string, or a function of the
options returning one) names what else the result depends on (configs, code); it is part of
the cache key with the recipe's name, options and module source.

**The cache.** ``<lake>/counterfactual/models/<key>/`` where ``key`` hashes the recipe identity,
the seed and every training document (id and text). A run whose key exists is not retrained
(``reused``), whichever partition asks; measurements are cached beside it per query set.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..lake.atomic import atomic_directory, atomic_write, atomic_write_json
from ..lake.layout import LakeLayout
from .counterfactual import digest

log = logging.getLogger(__name__)
RECORD = "run.json"
MEASURE_VERSION = 1  # bump when measure() changes what it reports: cached outputs are keyed by it


class RecipeError(ValueError):
    """The training recipe cannot be loaded or broke its contract."""


@dataclass(frozen=True)
class Recipe:
    """A loaded training recipe and its identity (part of every cache key)."""

    spec: str
    options: Mapping[str, Any]
    fn: Callable[..., Any]
    identity: str

    @classmethod
    def load(cls, spec: str, options: Mapping[str, Any]) -> "Recipe":
        module_name, _, name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise RecipeError(f"recipe {spec!r}: cannot import {module_name!r} ({err}); is it on the Python path?") from err
        fn = getattr(module, name, None)
        if not callable(fn):
            raise RecipeError(f"recipe {spec!r}: {module_name} has no function {name!r}")
        params = inspect.signature(fn).parameters
        if len([p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) < 3:
            raise RecipeError(f"recipe {spec!r}: must take (corpus_docs, out_dir, seed, **options)")
        version = getattr(fn, "version", "")
        version = version(**options) if callable(version) else str(version)
        try:
            source = hashlib.sha256(Path(inspect.getfile(module)).read_bytes()).hexdigest()[:16]
        except (OSError, TypeError):
            source = ""
        return cls(spec, dict(options), fn, digest(spec, dict(options), version, source))

    def train(self, docs: Sequence[Mapping[str, Any]], out_dir: Path, seed: int) -> Path:
        model_dir = self.fn([dict(d) for d in docs], out_dir, seed, **self.options)
        model_dir = Path(model_dir or "").resolve()
        if not (model_dir / "config.json").is_file():
            raise RecipeError(f"recipe {self.spec!r} returned {model_dir}, which holds no config.json: "
                              "return the fine-tuned Hugging Face model directory")
        if out_dir.resolve() not in (model_dir, *model_dir.parents):
            raise RecipeError(f"recipe {self.spec!r} returned {model_dir}, outside its out_dir {out_dir}: write the model there")
        return model_dir


def cache_dir(layout: LakeLayout, key: str) -> Path:
    return layout.counterfactual_model_dir(key)


def training_key(recipe: Recipe, seed: int, docs: Sequence[Mapping[str, Any]]) -> str:
    """Content address of a retrain: recipe identity, seed, every (doc_id, text) in order."""
    h = hashlib.sha256(json.dumps([recipe.identity, seed], sort_keys=True).encode())
    for d in docs:
        h.update(d["doc_id"].encode() + b"\0" + hashlib.sha256(d["text"].encode()).digest())
    return h.hexdigest()[:24]


def train_or_reuse(layout: LakeLayout, recipe: Recipe, docs: Sequence[Mapping[str, Any]], seed: int,
                   run_info: Mapping[str, Any]) -> dict:
    """The run's record (``key``, ``model_dir``, ``train_seconds``, ``reused``): trained now, or
    found in the cache. The model directory appears whole or not at all."""
    key = training_key(recipe, seed, docs)
    folder = cache_dir(layout, key)
    record_path = folder / RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return {**record, "model_dir": str(folder / record["model_subdir"]), "reused": True}
    started = time.perf_counter()
    with atomic_directory(folder) as tmp:
        model_dir = recipe.train(docs, tmp, seed)
        record = {"key": key, "recipe": recipe.spec, "recipe_identity": recipe.identity, "seed": seed,
                  "n_train_docs": len(docs), "model_subdir": str(model_dir.relative_to(tmp.resolve())),
                  "train_seconds": round(time.perf_counter() - started, 3), "first_run": dict(run_info)}
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("retrained %s (%d documents, seed %d) in %.1f s", key, len(docs), seed, record["train_seconds"])
    return {**record, "model_dir": str(folder / record["model_subdir"]), "reused": False}


# ------------------------------------------------------------------ measurement


def queries_digest(queries: pa.Table) -> str:
    rows = queries.select(["query_id", "prompt", "completion", "meta"]).to_pylist()
    return digest(rows)


def measure(model_dir: str | Path, queries: pa.Table, settings) -> pa.Table:
    """Per query: ``logp`` = log p(completion | prompt) summed over the completion's tokens
    (tokenized exactly as the influence measurement f, after ``<bos>``), and the ``greedy``
    answer (as many new tokens as the completion has, cut at an end token); ``correct`` when
    the greedy tokens are the completion's."""
    import torch

    from ..engine.batching import collate
    from ..engine.objectives import log_likelihood
    from ..engine.generation import greedy_token_ids
    from .models import load_finetuned
    from .queries import query_examples

    ft = load_finetuned(model_dir, settings)
    if ft.task != "causal_lm":
        raise ValueError(f"{model_dir}: the counterfactual evaluation measures causal-LM fine-tunes only (got {ft.task})")
    examples = query_examples(queries, ft)
    device = next(ft.model.parameters()).device
    pad = ft.tokenizer.pad_token_id if ft.tokenizer.pad_token_id is not None else 0
    logps, prompts, targets = [], [], []
    with torch.no_grad():
        for i, ex in enumerate(examples):
            batch = collate([ex], [i], pad).to(device)
            logits = ft.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logps.append(float(log_likelihood(logits.double(), batch)))
            n_prompt = ex.target_mask.index(True)
            prompts.append(list(ex.input_ids[:n_prompt]))
            targets.append(list(ex.input_ids[n_prompt:]))
    config = getattr(ft.model, "generation_config", None)
    ends = [t for t in (ft.tokenizer.eos_token_id, getattr(config, "eos_token_id", None)) if isinstance(t, int)]
    greedy = greedy_token_ids(ft.model, prompts, max(len(t) for t in targets), ends or None, pad) if prompts else []
    return pa.table({
        "query_id": queries.column("query_id").to_pylist(),
        "logp": pa.array(logps, pa.float64()),
        "n_tokens": pa.array([len(t) for t in targets], pa.int32()),
        "greedy": [ft.tokenizer.decode(g, skip_special_tokens=True) for g in greedy],
        "correct": [list(g) == t for g, t in zip(greedy, targets)],
    })


def measure_cached(record: Mapping[str, Any], layout: LakeLayout, queries: pa.Table, settings) -> pa.Table:
    """:func:`measure`, cached beside the model per query set (and dtype)."""
    path = cache_dir(layout, record["key"]) / f"outputs-v{MEASURE_VERSION}-{queries_digest(queries)}-{settings.dtype}.parquet"
    if path.is_file():
        return pq.read_table(path)
    table = measure(record["model_dir"], queries, settings)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return table


def read_record(layout: LakeLayout, key: str) -> dict:
    path = cache_dir(layout, key) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"retrained model {key} is not in the cache ({path}); materialize its partition")
    return json.loads(path.read_text(encoding="utf-8"))


def write_run_pointer(layout: LakeLayout, asset: str, partition: str, payload: Mapping[str, Any]) -> Path:
    """``counterfactual/runs/<asset>/<partition>.json``: which cached model a partition holds now."""
    return atomic_write_json(layout.counterfactual_run_file(asset, partition), dict(payload))


def read_run_pointer(layout: LakeLayout, asset: str, partition: str) -> dict:
    path = layout.counterfactual_run_file(asset, partition)
    if not path.is_file():
        raise FileNotFoundError(f"{asset}[{partition}] has not been materialized ({path} is missing)")
    return json.loads(path.read_text(encoding="utf-8"))
