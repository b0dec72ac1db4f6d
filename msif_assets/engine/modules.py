"""Module discovery: which linear maps of a model are tracked, in (d_out, d_in) orientation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import HeadBlocks, layout_for, match_rule

Scope = Literal["mlp", "attn", "all"]
SCOPES: tuple[str, ...] = ("mlp", "attn", "all")


@dataclass(frozen=True)
class ModuleSpec:
    """A tracked linear map ``y = W a (+ b)``.

    ``d_in`` counts the appended constant 1 when the module has a bias, so the gradient
    ``DW = Σ_t s_t a_tᵀ`` has shape ``(d_out, d_in)`` and its last column is the bias gradient.
    ``head_blocks`` (q/k/v projections only) lists the ``(start, stop)`` output rows of each
    (head, q/k/v) block.
    """

    name: str
    group: str  # "mlp" | "attn"
    role: str  # "qkv" | "q" | "k" | "v" | "o" | "mlp"
    d_out: int
    d_in: int
    has_bias: bool
    transposed: bool  # GPT-2 Conv1D: weight stored as (in, out)
    head_blocks: HeadBlocks | None

    @property
    def layer_index(self) -> int:
        """Index of the decoder block (the first integer in the dotted name)."""
        return next(int(part) for part in self.name.split(".") if part.isdigit())

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in


def _linear_shape(module: nn.Module) -> tuple[int, int, bool, bool]:
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_out, d_in, module.bias is not None, True
    if isinstance(module, nn.Linear):
        d_out, d_in = module.weight.shape
        return d_out, d_in, module.bias is not None, False
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor Conv1D")


def discover_modules(model: nn.Module, scope: Scope = "all") -> list[ModuleSpec]:
    """Tracked modules of ``model`` in forward order.

    Raises ``UnsupportedArchitectureError`` for an unknown architecture and ``ValueError``
    when a known architecture yields no tracked module (e.g. renamed submodules).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; choose one of {SCOPES}")
    layout = layout_for(model.config)
    specs: list[ModuleSpec] = []
    for name, module in model.named_modules():
        rule = match_rule(layout, name)
        if rule is None or (scope != "all" and rule.group != scope):
            continue
        d_out, d_in, has_bias, transposed = _linear_shape(module)
        blocks = layout.head_blocks(model.config, rule.role)
        if blocks is not None and blocks[-1][1] != d_out:
            raise ValueError(f"{name}: head layout covers {blocks[-1][1]} rows but d_out={d_out}")
        specs.append(
            ModuleSpec(name, rule.group, rule.role, d_out, d_in + int(has_bias), has_bias, transposed, blocks)
        )
    if not specs:
        raise ValueError(f"no tracked modules found in {type(model).__name__} for scope={scope!r}")
    return specs


class IncompatibleModelsError(ValueError):
    """The pre-trained and fine-tuned models do not share the tracked modules."""


def shared_modules(pt_model: nn.Module, ft_model: nn.Module, scope: Scope = "all") -> list[ModuleSpec]:
    """Modules tracked in both models (by name), after checking that every one matches.

    A fine-tune whose head was replaced (sequence classification) shares all decoder-block
    modules; modules present in only one model are not tracked. Any shape or layout mismatch
    of a shared module raises ``IncompatibleModelsError`` listing every mismatch.
    """
    pt_config, ft_config = pt_model.config, ft_model.config
    problems: list[str] = []
    if pt_config.model_type != ft_config.model_type:
        problems.append(f"model_type: pre-trained {pt_config.model_type!r} vs fine-tuned {ft_config.model_type!r}")
        raise IncompatibleModelsError("; ".join(problems))
    pt_specs = {s.name: s for s in discover_modules(pt_model, scope)}
    ft_specs = {s.name: s for s in discover_modules(ft_model, scope)}
    shared = [name for name in pt_specs if name in ft_specs]
    for name in pt_specs.keys() ^ ft_specs.keys():
        owner = "pre-trained" if name in pt_specs else "fine-tuned"
        problems.append(f"{name}: only in the {owner} model")
    for name in shared:
        a, b = pt_specs[name], ft_specs[name]
        for field in ("d_out", "d_in", "has_bias", "transposed", "head_blocks"):
            if getattr(a, field) != getattr(b, field):
                problems.append(f"{name}.{field}: pre-trained {getattr(a, field)} vs fine-tuned {getattr(b, field)}")
    if not shared or any(": only in" not in p for p in problems):
        raise IncompatibleModelsError(
            "pre-trained and fine-tuned models do not match:\n  " + "\n  ".join(problems or ["no shared modules"])
        )
    return [pt_specs[name] for name in shared]


def weight_matrix(module: nn.Module, spec: ModuleSpec) -> torch.Tensor:
    """``[W | b]`` of a tracked module, shape ``(d_out, d_in)``."""
    weight = module.weight.T if spec.transposed else module.weight
    if spec.has_bias:
        return torch.cat([weight, module.bias[:, None]], dim=1)
    return weight
