"""Measuring the demo models: greedy QA exact match and parameter distance between checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from msif_assets.demo.device import pick_device, torch_threads
from msif_assets.engine.generation import greedy_token_ids
from msif_assets.engine.metrics import relative_distance


def _field(row: Any, name: str) -> str:
    value = row[name] if isinstance(row, Mapping) else getattr(row, name, None)
    if not isinstance(value, str):
        raise ValueError(f"QA row {row!r}: field {name!r} must be a string")
    return value


def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (encoded with the tokenizer's ``<bos>``),
    cut before the first ``<eos>``; see :func:`msif_assets.engine.generation.greedy_token_ids`."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    return greedy_token_ids(model, encoded, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size)


def qa_exact_match(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, qa_rows: Iterable[Any], batch_size: int = 64
) -> tuple[float, list[bool]]:
    """(accuracy, per-row hit): a hit when the greedy continuation is exactly the completion's
    tokens followed by ``<eos>``. Rows are mappings or objects with ``prompt`` and ``completion``."""
    rows = list(qa_rows)
    if not rows:
        raise ValueError("qa_exact_match: no QA rows given")
    prompts = [_field(r, "prompt") for r in rows]
    targets = [tokenizer(_field(r, "completion"), add_special_tokens=False)["input_ids"] for r in rows]
    was_training = model.training
    model.eval()
    try:
        preds = greedy_completions(model, tokenizer, prompts, max(len(t) for t in targets) + 1, batch_size)
    finally:
        model.train(was_training)
    hits = [list(p) == list(t) for p, t in zip(preds, targets)]
    return sum(hits) / len(hits), hits


def evaluate_qa(
    model_dir: str | os.PathLike, qa_rows: Iterable[Any], device: str = "auto", num_threads: int = 1
) -> float:
    """Greedy exact-match accuracy of the model saved in ``model_dir`` on ``qa_rows``
    (``num_threads``: CPU threads, 0 = all cores; see ``TrainConfig.num_threads``)."""
    with torch_threads(num_threads):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).to(pick_device(device))
        return qa_exact_match(model, tokenizer, qa_rows)[0]


def _weights(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights; save the model with save_pretrained()")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def relative_param_distance(pt_dir: str | os.PathLike, ft_dir: str | os.PathLike) -> float:
    """``‖θ_ft − θ_pt‖₂ / ‖θ_pt‖₂`` over every weight present, with equal shape, in both checkpoints."""
    pt, ft = _weights(pt_dir), _weights(ft_dir)
    shared = [k for k in pt if k in ft and pt[k].shape == ft[k].shape and pt[k].is_floating_point()]
    if not shared:
        raise ValueError(f"{pt_dir} and {ft_dir} share no weights of equal shape")
    return relative_distance({k: pt[k] for k in shared}, {k: ft[k] for k in shared})
