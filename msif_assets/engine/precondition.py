"""Damped inverse-GGN-vector products ``P(V) = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .factors import EkfacFactors


@dataclass(frozen=True)
class Damping:
    """``absolute``: λ = value. ``relative``: λ = value · mean(Λ), per module (0.1 is the usual
    heuristic). Damping changes rankings; every result records ``label``."""

    mode: Literal["absolute", "relative"] = "relative"
    value: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("absolute", "relative"):
            raise ValueError(f"damping mode={self.mode!r}; choose 'absolute' or 'relative'")
        if not (self.value > 0 and math.isfinite(self.value)):
            raise ValueError(f"damping value must be finite and > 0, got {self.value}")

    def resolve(self, lambdas: torch.Tensor) -> float:
        return float(self.value * lambdas.mean()) if self.mode == "relative" else float(self.value)

    @property
    def label(self) -> str:
        return f"{'rel' if self.mode == 'relative' else 'abs'}:{self.value:g}"

    @classmethod
    def parse(cls, text: str) -> "Damping":
        """``"rel:0.1"`` / ``"abs:1e-3"``."""
        mode, _, value = text.partition(":")
        modes = {"rel": "relative", "relative": "relative", "abs": "absolute", "absolute": "absolute"}
        try:
            number = float(value)
        except ValueError:
            number = None
        if mode not in modes or number is None:
            raise ValueError(f"damping {text!r}: write 'rel:<alpha>' or 'abs:<lambda>', e.g. 'rel:0.1' or 'abs:1e-3'")
        return cls(modes[mode], number)


def precondition(
    factors: EkfacFactors, vectors: dict[str, torch.Tensor], damping: Damping
) -> dict[str, torch.Tensor]:
    """Apply the damped EK-FAC inverse to each module's batch of matrices.

    ``vectors[name]``: (Q, m, n). Returns new tensors of the same shape and dtype; computed in
    float64; stored factors are never modified, so identical calls give identical results.
    """
    out: dict[str, torch.Tensor] = {}
    basis = factors.eigenbasis
    for name, v in vectors.items():
        q_a, q_s = basis.q_a[name].to(v.device), basis.q_s[name].to(v.device)
        lambdas = factors.lambdas[name].to(v.device)
        denominator = lambdas + damping.resolve(lambdas)
        rotated = q_s.T @ v.double() @ q_a
        out[name] = (q_s @ (rotated / denominator) @ q_a.T).to(v.dtype)
    return out
