"""Exact (dense) damped-GGN influence for small models: the ground truth EK-FAC approximates.

The GGN of the summed log-likelihood, averaged over sequences like EK-FAC's Λ:
``G = mean_z Σ_{target t} J_tᵀ (diag p_t − p_t p_tᵀ) J_t`` with ``J_t = ∂logits_t/∂θ`` over the
tracked parameters. ``P`` below is the number of tracked parameters (all modules' ``(m, n)``
matrices flattened row-major and concatenated in ``specs`` order). Memory is O(P²): use only
on models with a few thousand tracked parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .batching import LMExample
from .modules import ModuleSpec


def flatten_gradients(gradients: dict[str, torch.Tensor], specs: list[ModuleSpec]) -> torch.Tensor:
    """``{name: (N, m, n)}`` → (N, P)."""
    return torch.cat([gradients[s.name].reshape(gradients[s.name].shape[0], -1) for s in specs], dim=1)


def _logit_jacobian(model: nn.Module, specs: list[ModuleSpec], example: LMExample) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(J (K, V, P), probs (K, V))`` over the K target positions of ``example``."""
    modules = dict(model.named_modules())
    params: list[torch.Tensor] = []
    for spec in specs:
        module = modules[spec.name]
        params += [module.weight] + ([module.bias] if spec.has_bias else [])
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in previous:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        ids = torch.tensor([example.input_ids], device=params[0].device)
        logits = model(input_ids=ids).logits[0]
        rows = [t - 1 for t in range(1, len(example.input_ids)) if example.target_mask[t]]
        selected = logits[rows]  # (K, V)
        k, v = selected.shape
        basis = torch.eye(k * v, dtype=selected.dtype, device=selected.device).reshape(k * v, k, v)
        grads = torch.autograd.grad(selected, params, grad_outputs=basis, is_grads_batched=True)
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)
    columns, cursor = [], 0
    for spec in specs:
        weight_grad = grads[cursor]
        cursor += 1
        weight_grad = weight_grad.transpose(1, 2) if spec.transposed else weight_grad
        if spec.has_bias:
            weight_grad = torch.cat([weight_grad, grads[cursor][:, :, None]], dim=2)
            cursor += 1
        columns.append(weight_grad.reshape(k * v, -1))
    return torch.cat(columns, 1).reshape(k, v, -1), torch.softmax(selected.detach(), -1)


def exact_ggn(model: nn.Module, specs: list[ModuleSpec], examples: Sequence[LMExample]) -> torch.Tensor:
    """Dense GGN (P, P) in float64, averaged over ``examples``."""
    total = None
    for example in examples:
        jac, probs = _logit_jacobian(model, specs, example)
        jac, probs = jac.double(), probs.double()
        # diag(p) − p pᵀ = L Lᵀ with L = diag(√p) − p √pᵀ, so each position adds (Lᵀ J)ᵀ (Lᵀ J)
        root = probs.sqrt()
        factor = torch.diag_embed(root) - probs[:, :, None] * root[:, None, :]
        half = torch.einsum("kuv,kup->kvp", factor, jac).reshape(-1, jac.shape[-1])
        block = half.T @ half
        total = block if total is None else total + block
    return total / len(examples)


def exact_influence(ggn: torch.Tensor, query_grads: torch.Tensor, candidate_grads: torch.Tensor, damping: float) -> torch.Tensor:
    """``g_zᵀ (G + λI)⁻¹ g_q`` → (N, Q), from flat gradients (Q, P) and (N, P)."""
    system = ggn + damping * torch.eye(ggn.shape[0], dtype=ggn.dtype, device=ggn.device)
    solved = torch.linalg.solve(system, query_grads.double().T)  # (P, Q)
    return candidate_grads.double() @ solved
