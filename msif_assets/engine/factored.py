"""Query gradients kept in token form and preconditioned into low-rank vectors without ever
forming a full-size rotation.

A query's gradient of one module is exactly ``DW_q = S_qᵀ A_q`` with ``S_q`` (T, m) its output
gradients and ``A_q`` (T, n) its inputs: rank ≤ T and T(m + n) numbers instead of m·n. EK-FAC
preconditioning ``P(V) = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` then costs, per query,

* rotating in from factors, ``(Q_Sᵀ L)(Q_Aᵀ R)ᵀ``: k(m² + n²) + m·n·k for k columns,
* the elementwise division: m·n,
* the best rank-r approximation of the result in the eigenbasis (randomized SVD, a fixed
  seed): ≈ 2(p + 2)·m·n·(r + 10) for p power iterations,
* rotating the factors back: r(m² + n²),

instead of 2(m²n + mn²) for the dense rotations. Because Q_S, Q_A are orthogonal, the rank-r
SVD taken in the eigenbasis is the rank-r SVD of the preconditioned matrix itself: SS-IF and
GDP vectors equal :func:`lowrank.truncate` of the dense path up to the SVD's accuracy.

MS-IF chains two stages, P_pt(P_ft ∇f). The first stage's output is truncated to
``inner_rank`` before it is rotated into the pre-trained basis — an approximation the dense
path does not make (``bench/lowrank.py`` measures it against the exact scores).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from .factors import EkfacFactors
from .lowrank import LowRankQueries
from .precondition import Damping, precondition

POWER_ITERATIONS = 2
OVERSAMPLE = 10


@dataclass(frozen=True)
class Factored:
    """Q matrices as ``left @ right.mT``: left (Q, m, k), right (Q, n, k)."""

    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.left @ self.right.mT


@dataclass(frozen=True)
class TokenGradients:
    """One module's exact query gradients in token form: ``DW_q = s_qᵀ a_q``.

    ``a`` (Q, T, n) inputs (bias column included), ``s`` (Q, T, m) output gradients; tokens
    past a query's length are zero rows in both."""

    a: torch.Tensor
    s: torch.Tensor

    def factored(self) -> Factored:
        return Factored(self.s.mT, self.a.mT)

    def dense(self) -> torch.Tensor:
        """(Q, m, n)."""
        return self.s.mT @ self.a


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def top_singular(matrices: torch.Tensor, rank: int, seed: int = 0) -> Factored:
    """Best rank-``rank`` approximation of each (m, n) matrix of ``matrices`` (Q, m, n) as
    ``U diag(σ)`` (Q, m, r) and ``V`` (Q, n, r): a randomized range finder with power
    iterations (Halko et al. 2011), exact SVD where the sketch would cover the whole matrix.
    Deterministic: the sketch is drawn from ``seed``."""
    q, m, n = matrices.shape
    width = rank + OVERSAMPLE
    if width >= min(m, n):
        u, sigma, vh = torch.linalg.svd(matrices, full_matrices=False)
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        sketch = torch.randn(n, width, generator=generator, dtype=matrices.dtype).to(matrices.device)
        basis = _orthonormal(matrices @ sketch)  # (Q, m, width)
        for _ in range(POWER_ITERATIONS):
            basis = _orthonormal(matrices @ _orthonormal(matrices.mT @ basis))
        u_small, sigma, vh = torch.linalg.svd(basis.mT @ matrices, full_matrices=False)  # (Q, width, n)
        u = basis @ u_small
    return Factored(u[..., :rank] * sigma[:, None, :rank], vh[:, :rank, :].mT)


def exact_truncation(x: Factored, rank: int) -> Factored:
    """Best rank-``rank`` approximation of ``L Rᵀ`` from the factors alone (QR of each side and
    an SVD of the k×k core), zero-padded to ``rank`` columns when k < rank."""
    q_l, r_l = torch.linalg.qr(x.left)
    q_r, r_r = torch.linalg.qr(x.right)
    u, sigma, vh = torch.linalg.svd(r_l @ r_r.mT)
    keep = min(rank, sigma.shape[-1])
    left, right = q_l @ (u[..., :keep] * sigma[:, None, :keep]), q_r @ vh[:, :keep, :].mT
    if keep < rank:
        pad = lambda t: torch.nn.functional.pad(t, (0, rank - keep))  # noqa: E731
        left, right = pad(left), pad(right)
    return Factored(left, right)


def rotate(basis: torch.Tensor, x: torch.Tensor, into: bool) -> torch.Tensor:
    """``basisᵀ @ x`` (``into``) or ``basis @ x`` for x (Q, d, k) and basis (d, d), as one GEMM
    over all Q·k columns: a broadcast batched matmul streams the d×d basis once per query and is
    ~4× slower on CPU for the narrow k of token-form gradients."""
    q, d, k = x.shape
    flat = x.mT.reshape(q * k, d)  # (Q·k, d)
    return (flat @ (basis if into else basis.T)).reshape(q, k, d).mT


def precondition_stage(x: Factored, factors: EkfacFactors, name: str, damping: Damping, rank: int,
                       svd_dtype: torch.dtype = torch.float64) -> Factored:
    """Rank-``rank`` approximation of ``P(L Rᵀ)`` for one module, never forming Q_S·V·Q_A.

    The rotation in and the division by Λ + λ run in float64: small dampings amplify their
    rounding. The SVD and the rotation back run in ``svd_dtype``; float32 there costs a
    relative ~1e-6 of the result (far below the truncation error) and is 2–3× faster on CPU."""
    basis = factors.eigenbasis
    device = x.left.device
    q_a, q_s = basis.q_a[name].to(device, torch.float64), basis.q_s[name].to(device, torch.float64)
    lambdas = factors.lambdas[name].to(device, torch.float64)
    rotated = rotate(q_s, x.left.double(), into=True) @ rotate(q_a, x.right.double(), into=True).mT  # (Q, m, n) in the eigenbasis
    rotated /= lambdas + damping.resolve(lambdas)
    top = top_singular(rotated.to(svd_dtype), rank)
    return Factored(rotate(q_s.to(svd_dtype), top.left, into=False), rotate(q_a.to(svd_dtype), top.right, into=False))


def is_low_rank_worth_it(rank: int, m: int, n: int) -> bool:
    """Factors are kept only where they are smaller than the matrix (as :func:`lowrank.truncate`)."""
    return 0 < rank and rank * (m + n) < m * n


def low_rank_vectors(
    method: str,
    tokens: TokenGradients,
    name: str,
    rank: int,
    inner_rank: int,
    pt_factors: EkfacFactors | None,
    ft_factors: EkfacFactors | None,
    damping: Damping,
    ft_stages: dict | None = None,
) -> "LowRankQueries | torch.Tensor":
    """One module's vectors for ``method`` at ``rank``: low-rank factors in ``tokens``' dtype,
    or the exact dense vectors (the dense path's arithmetic) where factors would not be smaller.

    ``ft_stages``: a dict kept by the caller for one module and block, so the fine-tuned stage
    at one (damping, rank) is computed once — SS-IF's result is MS-IF's first stage whenever
    the inner rank equals the rank (the default). Same seed, same arithmetic: identical output."""
    dtype = tokens.a.dtype
    m, n = tokens.s.shape[-1], tokens.a.shape[-1]
    if not is_low_rank_worth_it(rank, m, n):
        dense = {name: tokens.dense()}
        if method == "gdp":
            return dense[name]
        out = precondition(ft_factors, dense, damping)
        return (out if method == "ss-if" else precondition(pt_factors, out, damping))[name]
    x = tokens.factored()
    svd_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if method == "gdp":
        x = exact_truncation(Factored(x.left.double(), x.right.double()), rank)
    elif method in ("ss-if", "ms-if"):
        stage_rank = rank if method == "ss-if" else max(inner_rank, rank)
        stages = {} if ft_stages is None else ft_stages
        if (damping, stage_rank) not in stages:
            stages[(damping, stage_rank)] = precondition_stage(x, ft_factors, name, damping, stage_rank, svd_dtype)
        x = stages[(damping, stage_rank)]
        if method == "ms-if":
            x = precondition_stage(x, pt_factors, name, damping, rank, svd_dtype)
    else:
        raise ValueError(f"method={method!r}; choose ms-if, ss-if or gdp")
    return LowRankQueries(x.left.to(dtype).contiguous(), x.right.to(dtype).contiguous())
