"""Low-rank query vectors (kronfluence's ``query_gradient_low_rank``): a preconditioned query
gradient ``V_q`` (m, n) of one module is kept as its truncated SVD ``V_q ≈ L_q R_qᵀ`` with
``L_q = U_q diag(σ_q)`` (m, r) and ``R_q`` (n, r), so storage is r(m + n) per query and module
instead of m·n, and scoring contracts each token against the factors without forming ``V_q``:

    ⟨V_q, Σ_t s_t a_tᵀ⟩ = Σ_t Σ_k (s_tᵀ L_qk)(a_tᵀ R_qk)

Where the factors would not be smaller than the matrix (r(m + n) >= m·n) the dense matrix is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankQueries:
    """One module's query vectors in factored form: ``left`` (Q, m, r), ``right`` (Q, n, r)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.left.shape[-1])

    @property
    def n_queries(self) -> int:
        return int(self.left.shape[0])

    def dense(self) -> torch.Tensor:
        """(Q, m, n) = L Rᵀ: what the factors stand for (tests and analysis)."""
        return self.left @ self.right.transpose(1, 2)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LowRankQueries":
        return LowRankQueries(self.left.to(device, dtype), self.right.to(device, dtype))

    def rows(self, start: int, stop: int) -> "LowRankQueries":
        return LowRankQueries(self.left[start:stop], self.right[start:stop])


QueryVectors = "torch.Tensor | LowRankQueries"


def truncate(vectors: torch.Tensor, rank: int) -> torch.Tensor | LowRankQueries:
    """The best rank-``rank`` approximation of each (m, n) matrix of ``vectors`` (Q, m, n), in
    Frobenius norm (SVD in float64, factors returned in the input dtype); the dense input when
    ``rank`` is 0 or the factors would not be smaller (r(m + n) >= m·n, which includes r >= min(m, n))."""
    q, m, n = vectors.shape
    if rank <= 0 or rank * (m + n) >= m * n:
        return vectors
    u, sigma, vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    left = u[..., :rank] * sigma[:, None, :rank]
    right = vh[:, :rank, :].transpose(1, 2)
    return LowRankQueries(left.to(vectors.dtype).contiguous(), right.to(vectors.dtype).contiguous())


def stack(parts: list[torch.Tensor | LowRankQueries]) -> torch.Tensor | LowRankQueries:
    """Concatenate query vectors along Q (all dense, or all low-rank of one rank)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, 0)
    if all(isinstance(p, LowRankQueries) for p in parts) and len({p.rank for p in parts}) == 1:
        return LowRankQueries(torch.cat([p.left for p in parts], 0), torch.cat([p.right for p in parts], 0))
    return torch.cat([p.dense() if isinstance(p, LowRankQueries) else p for p in parts], 0)


def n_queries(vectors: torch.Tensor | LowRankQueries) -> int:
    return vectors.n_queries if isinstance(vectors, LowRankQueries) else int(vectors.shape[0])


def token_path_is_cheaper(vectors: LowRankQueries, batch: int, tokens: int, m: int, n: int) -> bool:
    """Multiply-adds per batch of B sequences of T tokens: against the factors token by token,
    B·T·Q·r·(m + n), versus forming this module's V = L Rᵀ once for the batch and the dense path,
    Q·m·n·r + B·m·n·(T + Q). Small ranks and short sequences favour the factors; both give the
    same scores."""
    q, r = vectors.n_queries, vectors.rank
    return batch * tokens * q * r * (m + n) <= q * m * n * r + batch * m * n * (tokens + q)


def contract(a: torch.Tensor, s: torch.Tensor, vectors: LowRankQueries) -> torch.Tensor:
    """Per-token scores (B, Q, T) of tokens ``a`` (B, T, n), ``s`` (B, T, m) against the factors."""
    left, right = vectors.left.to(a.dtype), vectors.right.to(a.dtype)
    s_left = torch.einsum("btm,qmr->bqtr", s, left)
    a_right = torch.einsum("btn,qnr->bqtr", a, right)
    return (s_left * a_right).sum(-1)
