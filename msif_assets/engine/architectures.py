"""Where each supported architecture keeps its tracked linear maps, and how q/k/v are laid out.

A layout answers two questions for a decoder block:
  * which submodules are tracked, and whether each is MLP or attention;
  * for q/k/v projections, which output rows belong to which (head, q/k/v) block.

Rows are always in (d_out, d_in) orientation (GPT-2's ``Conv1D`` stores the transpose).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from transformers import PretrainedConfig

HeadBlocks = tuple[tuple[int, int], ...]
"""Output-row blocks of a q/k/v projection: ``(start_row, stop_row)`` per (head, role) block,
in the order ``role-major`` or ``head-major`` as the architecture stores them."""


@dataclass(frozen=True)
class ModuleRule:
    """One tracked submodule of a decoder block, relative to the block (e.g. ``mlp.c_fc``)."""

    suffix: str
    group: str  # "mlp" or "attn"
    role: str  # "qkv" (fused), "q", "k", "v", "o" or "mlp"


@dataclass(frozen=True)
class ArchitectureLayout:
    model_types: tuple[str, ...]
    block_pattern: str  # regex matching a decoder block's full module name
    rules: tuple[ModuleRule, ...]
    head_blocks: Callable[[PretrainedConfig, str], HeadBlocks | None]


def _attr(config: PretrainedConfig, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"config of model_type={config.model_type!r} has none of {names}")


def _blocks(starts: list[int], head_dim: int) -> HeadBlocks:
    return tuple((s, s + head_dim) for s in starts)


def _interleaved_qkv(config: PretrainedConfig, role: str) -> HeadBlocks | None:
    """GPT-NeoX and BLOOM: fused rows ``[head][q,k,v][head_dim]``."""
    if role != "qkv":
        return None
    n_heads = _attr(config, "num_attention_heads", "n_head")
    head_dim = _attr(config, "hidden_size", "n_embed") // n_heads
    return _blocks([(h * 3 + r) * head_dim for h in range(n_heads) for r in range(3)], head_dim)


def _gpt2_qkv(config: PretrainedConfig, role: str) -> HeadBlocks | None:
    """GPT-2: fused rows ``[q|k|v]``, each ``[head][head_dim]``."""
    if role != "qkv":
        return None
    n_heads, hidden = _attr(config, "n_head"), _attr(config, "n_embd")
    head_dim = hidden // n_heads
    return _blocks([r * hidden + h * head_dim for r in range(3) for h in range(n_heads)], head_dim)


def _llama_qkv(config: PretrainedConfig, role: str) -> HeadBlocks | None:
    """Llama family: separate projections; k and v have ``num_key_value_heads`` (GQA)."""
    if role not in ("q", "k", "v"):
        return None
    n_heads = _attr(config, "num_attention_heads")
    head_dim = getattr(config, "head_dim", None) or _attr(config, "hidden_size") // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    count = n_heads if role == "q" else n_kv
    return _blocks([h * head_dim for h in range(count)], head_dim)


LAYOUTS: tuple[ArchitectureLayout, ...] = (
    ArchitectureLayout(
        model_types=("gpt_neox",),
        block_pattern=r"(?:.*\.)?layers\.\d+",
        rules=(
            ModuleRule("attention.query_key_value", "attn", "qkv"),
            ModuleRule("attention.dense", "attn", "o"),
            ModuleRule("mlp.dense_h_to_4h", "mlp", "mlp"),
            ModuleRule("mlp.dense_4h_to_h", "mlp", "mlp"),
        ),
        head_blocks=_interleaved_qkv,
    ),
    ArchitectureLayout(
        model_types=("gpt2",),
        block_pattern=r"(?:.*\.)?h\.\d+",
        rules=(
            ModuleRule("attn.c_attn", "attn", "qkv"),
            ModuleRule("attn.c_proj", "attn", "o"),
            ModuleRule("mlp.c_fc", "mlp", "mlp"),
            ModuleRule("mlp.c_proj", "mlp", "mlp"),
        ),
        head_blocks=_gpt2_qkv,
    ),
    ArchitectureLayout(
        model_types=("llama", "mistral", "qwen2"),
        block_pattern=r"(?:.*\.)?layers\.\d+",
        rules=(
            ModuleRule("self_attn.q_proj", "attn", "q"),
            ModuleRule("self_attn.k_proj", "attn", "k"),
            ModuleRule("self_attn.v_proj", "attn", "v"),
            ModuleRule("self_attn.o_proj", "attn", "o"),
            ModuleRule("mlp.gate_proj", "mlp", "mlp"),
            ModuleRule("mlp.up_proj", "mlp", "mlp"),
            ModuleRule("mlp.down_proj", "mlp", "mlp"),
        ),
        head_blocks=_llama_qkv,
    ),
    ArchitectureLayout(
        model_types=("bloom",),
        block_pattern=r"(?:.*\.)?h\.\d+",
        rules=(
            ModuleRule("self_attention.query_key_value", "attn", "qkv"),
            ModuleRule("self_attention.dense", "attn", "o"),
            ModuleRule("mlp.dense_h_to_4h", "mlp", "mlp"),
            ModuleRule("mlp.dense_4h_to_h", "mlp", "mlp"),
        ),
        head_blocks=_interleaved_qkv,
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for layout in LAYOUTS for t in layout.model_types)


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no known module layout."""


def layout_for(config: PretrainedConfig) -> ArchitectureLayout:
    model_type = getattr(config, "model_type", None)
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    raise UnsupportedArchitectureError(
        f"model_type={model_type!r} (architectures={getattr(config, 'architectures', None)}) is not "
        f"supported; msif tracks decoder blocks of: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Add an ArchitectureLayout in msif_assets/engine/architectures.py to support it."
    )


def match_rule(layout: ArchitectureLayout, name: str) -> ModuleRule | None:
    """The rule tracking the module called ``name`` (full dotted name), if any."""
    for rule in layout.rules:
        if re.fullmatch(layout.block_pattern + r"\." + re.escape(rule.suffix), name):
            return rule
    return None
