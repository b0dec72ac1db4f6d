"""Train the demo models: a tiny GPT-NeoX pre-trained on the world's corpus, then fully fine-tuned
on the fine-tune entities' QA pairs.

Each model is saved as a Hugging Face directory (``config.json``, ``model.safetensors``, the
tokenizer, and ``msif_training.json`` recording the configs and training curve), written into a
temp directory and renamed into place, so an interrupted run never leaves a half model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedModel

from msif_assets.lake.atomic import atomic_directory
from msif_assets.demo.device import pick_device, torch_threads
from msif_assets.demo.evaluate import evaluate_qa, relative_param_distance  # noqa: F401  (public API)
from msif_assets.demo.sequences import Example, collate, document_example, length_bucketed_batches, qa_example
from msif_assets.demo.world import World

log = logging.getLogger(__name__)

TRAINING_RECORD = "msif_training.json"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and the two training stages. ``intermediate_size=0`` means ``4 * hidden_size``.

    ``num_threads``: torch intra-op threads on CPU; 0 means every core this process may use (at
    most 16). The default is 1: these models are too small to gain from threads, and on a shared
    CPU extra threads spin against other processes (measured: 2 threads ran ~10x slower than 1
    on a loaded 2-core machine).
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 0
    max_length: int = 128
    attn_implementation: str = "sdpa"
    seed: int = 0
    device: str = "auto"
    num_threads: int = 1
    pretrain_lr: float = 2e-3
    pretrain_epochs: int = 12
    pretrain_batch_size: int = 32
    pretrain_weight_decay: float = 0.1
    finetune_lr: float = 1e-4
    finetune_epochs: int = 6
    finetune_batch_size: int = 32
    finetune_weight_decay: float = 0.0
    warmup_fraction: float = 0.05

    def __post_init__(self) -> None:
        positive = ("hidden_size", "num_layers", "num_heads", "max_length", "pretrain_epochs",
                    "pretrain_batch_size", "finetune_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("intermediate_size", "num_threads", "finetune_epochs", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TrainConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.max_length > 4096:
            raise ValueError(f"TrainConfig.max_length={self.max_length} is far beyond what the demo needs (<= 4096)")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"TrainConfig.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}")
        for name in ("pretrain_lr", "finetune_lr"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("pretrain_weight_decay", "finetune_weight_decay", "warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        extra = set(d) - {f.name for f in fields(cls)}
        if extra:
            raise ValueError(f"TrainConfig: unknown fields {sorted(extra)}")
        return cls(**d)


@dataclass(frozen=True)
class StageResult:
    """What one training stage did. ``epoch_losses``: mean token loss per epoch."""

    epoch_losses: tuple[float, ...]
    tokens_seen: int
    seconds: float


EpochCallback = Callable[[int, PreTrainedModel], None]


def train_causal_lm(
    model: PreTrainedModel,
    examples: list[Example],
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    warmup_fraction: float,
    pad_id: int,
    seed: int,
    stage: str,
    on_epoch: EpochCallback | None = None,
) -> StageResult:
    """AdamW with linear warm-up and cosine decay to 10% of ``lr``; the loss is the mean over
    target tokens of each batch (Hugging Face's reduction; fine for training)."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )
    steps_per_epoch = -(-len(examples) // batch_size)
    total = max(1, steps_per_epoch * epochs)
    warmup = int(warmup_fraction * total)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loss_sum, loss_tokens = 0.0, 0
        for group in length_bucketed_batches(examples, batch_size, rng):
            batch = collate(group, pad_id).to(device)
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n_targets = int((batch.labels[:, 1:] != -100).sum())
            loss_sum += float(out.loss.detach()) * n_targets
            loss_tokens += n_targets
            tokens += int(batch.attention_mask.sum())
        losses.append(loss_sum / max(1, loss_tokens))
        log.info("%s epoch %d/%d: loss %.4f (%.0f s)", stage, epoch, epochs, losses[-1], time.perf_counter() - started)
        if on_epoch is not None:
            on_epoch(epoch, model)
            model.train()
    return StageResult(tuple(losses), tokens, time.perf_counter() - started)


def model_config(cfg: TrainConfig, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> GPTNeoXConfig:
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        max_position_embeddings=cfg.max_length,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = cfg.attn_implementation
    return config


def _save(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike, record: dict) -> Path:
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


def read_training_record(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / TRAINING_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; was {model_dir} written by msif_assets.demo.train?")
    return json.loads(path.read_text(encoding="utf-8"))


def pretrain(
    world: World, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
    cfg: TrainConfig | None = None, on_epoch: EpochCallback | None = None,
) -> Path:
    """Train a randomly initialised ``GPTNeoXForCausalLM`` on every corpus document; save to ``out_dir``."""
    cfg = cfg or TrainConfig()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = [document_example(tokenizer, d.text, cfg.max_length) for d in world.documents]
    truncated = sum(len(e.input_ids) == cfg.max_length for e in examples)
    if truncated:
        log.warning("pretrain: %d documents truncated to max_length=%d tokens", truncated, cfg.max_length)
    with torch_threads(cfg.num_threads):
        torch.manual_seed(cfg.seed)
        config = model_config(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        model = GPTNeoXForCausalLM(config).to(pick_device(cfg.device))
        log.info("pretrain: %d documents, %d parameters, device %s",
                 len(examples), sum(p.numel() for p in model.parameters()), next(model.parameters()).device)
        result = train_causal_lm(
            model, examples, lr=cfg.pretrain_lr, epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size,
            weight_decay=cfg.pretrain_weight_decay, warmup_fraction=cfg.warmup_fraction,
            pad_id=tokenizer.pad_token_id, seed=cfg.seed, stage="pretrain", on_epoch=on_epoch,
        )
    record = {"stage": "pretrain", "train_config": cfg.to_dict(), "world_config": world.config.to_dict(),
              "attn_implementation": cfg.attn_implementation, **asdict(result)}
    return _save(model, tokenizer, out_dir, record)


def finetune(
    pt_dir: str | os.PathLike, world: World, out_dir: str | os.PathLike,
    cfg: TrainConfig | None = None, on_epoch: EpochCallback | None = None,
) -> Path:
    """Full-parameter fine-tune of the model in ``pt_dir`` on ``world.finetune`` (loss on completions)."""
    cfg = cfg or TrainConfig()
    tokenizer = AutoTokenizer.from_pretrained(pt_dir)
    examples = [qa_example(tokenizer, q.prompt, q.completion, cfg.max_length) for q in world.finetune]
    with torch_threads(cfg.num_threads):
        torch.manual_seed(cfg.seed + 1)
        model = AutoModelForCausalLM.from_pretrained(
            pt_dir, attn_implementation=cfg.attn_implementation, trust_remote_code=False
        ).to(pick_device(cfg.device))
        result = train_causal_lm(
            model, examples, lr=cfg.finetune_lr, epochs=cfg.finetune_epochs, batch_size=cfg.finetune_batch_size,
            weight_decay=cfg.finetune_weight_decay, warmup_fraction=cfg.warmup_fraction,
            pad_id=tokenizer.pad_token_id, seed=cfg.seed + 1, stage="finetune", on_epoch=on_epoch,
        )
    record = {"stage": "finetune", "train_config": cfg.to_dict(), "world_config": world.config.to_dict(),
              "attn_implementation": cfg.attn_implementation, "pretrained_from": str(pt_dir), **asdict(result)}
    return _save(model, tokenizer, out_dir, record)
