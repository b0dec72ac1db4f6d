"""Exact (dense) damped-GGN influence for small models: the ground truth EK-FAC approximates.

The GGN of the summed log-likelihood, averaged over sequences like EK-FAC's Λ:
``G = mean_z Σ_{target t} J_tᵀ (diag p_t − p_t p_tᵀ) J_t`` with ``J_t = ∂logits_t/∂θ`` over the
tracked parameters. ``P`` below is the number of tracked parameters (all modules' ``(m, n)``
matrices flattened row-major and concatenated in ``specs`` order). Memory is O(P²): use only
on models with a few thousand tracked parameters.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .batching import LMExample
from .modules import ModuleSpec
from .traversal import Progress


def flatten_gradients(gradients: dict[str, torch.Tensor], specs: list[ModuleSpec]) -> torch.Tensor:
    """``{name: (N, m, n)}`` → (N, P)."""
    return torch.cat([gradients[s.name].reshape(gradients[s.name].shape[0], -1) for s in specs], dim=1)


def _tracked_parameters(model: nn.Module, specs: list[ModuleSpec]) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    params: list[torch.Tensor] = []
    for spec in specs:
        module = modules[spec.name]
        params += [module.weight] + ([module.bias] if spec.has_bias else [])
    return params


@contextmanager
def _only_requiring_grad(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in previous:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)


def _ggn_half(model: nn.Module, specs: list[ModuleSpec], params: list[torch.Tensor], example: LMExample) -> torch.Tensor:
    """``H`` (K·V, P) with ``Hᵀ H`` = the example's GGN, over its K target positions.

    ``diag p − p pᵀ = L Lᵀ`` with ``L = diag(√p) − p √pᵀ``, so position k adds ``(Lᵀ J_k)ᵀ (Lᵀ J_k)``.
    The rows of ``Lᵀ J_k`` are vector-Jacobian products, all K·V computed by one batched
    (vmapped) backward pass with ``L``'s columns as output gradients: ``J`` itself is never formed."""
    ids = torch.tensor([example.input_ids], device=params[0].device)
    logits = model(input_ids=ids).logits[0]
    rows = [t - 1 for t in range(1, len(example.input_ids)) if example.target_mask[t]]
    selected = logits[rows]  # (K, V)
    k, v = selected.shape
    probs = torch.softmax(selected.detach().double(), -1)
    root = probs.sqrt()
    factor = torch.diag_embed(root) - probs[:, :, None] * root[:, None, :]  # L: (K, u, v)
    eye = torch.eye(k, dtype=factor.dtype, device=factor.device)
    # output gradient of row (k, v): L[k, :, v] at position k, zero at every other position
    basis = torch.einsum("kuv,kj->kvju", factor, eye).reshape(k * v, k, v).to(selected.dtype)
    grads = torch.autograd.grad(selected, params, grad_outputs=basis, is_grads_batched=True)
    columns, cursor = [], 0
    for spec in specs:
        weight_grad = grads[cursor]
        cursor += 1
        weight_grad = weight_grad.transpose(1, 2) if spec.transposed else weight_grad
        if spec.has_bias:
            weight_grad = torch.cat([weight_grad, grads[cursor][:, :, None]], dim=2)
            cursor += 1
        columns.append(weight_grad.reshape(k * v, -1))
    return torch.cat(columns, 1).double()


def _add_gram(total: torch.Tensor, half: torch.Tensor, edges: list[int]) -> None:
    """``total += halfᵀ half`` on the blocks on and above the diagonal only (the Gram matrix is
    symmetric: with b blocks, (b+1)/2b of a full product's multiply-adds, 5/8 for 4; measured
    1.4x faster); :func:`_symmetrize` fills the rest."""
    for i, (a0, a1) in enumerate(zip(edges, edges[1:])):
        for b0, b1 in zip(edges[i:], edges[i + 1 :]):
            total[a0:a1, b0:b1].addmm_(half[:, a0:a1].T, half[:, b0:b1])


def _symmetrize(upper: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """Copy the blocks above the diagonal to below it, and average each diagonal block with its
    transpose (a GEMM's ``hᵀh`` is symmetric only up to round-off): exactly symmetric."""
    for i, (a0, a1) in enumerate(zip(edges, edges[1:])):
        diagonal = upper[a0:a1, a0:a1]
        upper[a0:a1, a0:a1] = (diagonal + diagonal.T) / 2
        for b0, b1 in zip(edges[i + 1 :], edges[i + 2 :]):
            upper[b0:b1, a0:a1] = upper[a0:a1, b0:b1].T
    return upper


def exact_ggn(model: nn.Module, specs: list[ModuleSpec], examples: Sequence[LMExample], blocks: int | None = None) -> torch.Tensor:
    """Dense GGN (P, P) in float64, averaged over ``examples``; logs progress while it works.

    Per example: one forward and one batched backward (:func:`_ggn_half`), then a Gram update
    accumulated in place over ``blocks`` × ``blocks`` column blocks, upper triangle only
    (default: 4 from P = 1024 on, else 1)."""
    params = _tracked_parameters(model, specs)
    size = sum(p.numel() for p in params)
    blocks = max(1, min(size, blocks if blocks is not None else (4 if size >= 1024 else 1)))
    edges = [size * i // blocks for i in range(blocks + 1)]
    total = torch.zeros(size, size, dtype=torch.float64, device=params[0].device)
    progress = Progress(f"exact GGN ({size} parameters): sequence", len(examples))
    with _only_requiring_grad(model, params):
        for done, example in enumerate(examples, start=1):
            _add_gram(total, _ggn_half(model, specs, params, example), edges)
            progress.update(done)
    return _symmetrize(total, edges) / len(examples)


def exact_influence(ggn: torch.Tensor, query_grads: torch.Tensor, candidate_grads: torch.Tensor, damping: float) -> torch.Tensor:
    """``g_zᵀ (G + λI)⁻¹ g_q`` → (N, Q), from flat gradients (Q, P) and (N, P)."""
    system = ggn + damping * torch.eye(ggn.shape[0], dtype=ggn.dtype, device=ggn.device)
    solved = torch.linalg.solve(system, query_grads.double().T)  # (P, Q)
    return candidate_grads.double() @ solved
