"""What a traversal accumulates: covariances, corrected eigenvalues, per-sequence gradients,
or scores against preconditioned queries. Each is a few tensor contractions on ``a``/``s``.

Shapes: ``a`` (B, T, n), ``s`` (B, T, m) with n = d_in (bias column included), m = d_out.
"""

from __future__ import annotations

import torch

from . import lowrank
from .batching import LMBatch
from .lowrank import LowRankQueries
from .modules import ModuleSpec


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


def _per_sequence_gradient(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``DW_b = Σ_t s_bt a_btᵀ`` → (B, m, n)."""
    return torch.bmm(s.transpose(1, 2), a)


class CovarianceCollector:
    """Raw sums ``Σ_t a aᵀ`` (n, n) and ``Σ_t s sᵀ`` (m, m) in float64, plus the token count
    (non-pad positions). Sums, not means, so data partitions merge exactly. With
    ``product_dtype`` (e.g. bfloat16) each batch's products run in that precision."""

    def __init__(self, specs: list[ModuleSpec], product_dtype: torch.dtype | None = None):
        self.product_dtype = product_dtype
        self.a_sums: dict[str, torch.Tensor] = {}
        self.s_sums: dict[str, torch.Tensor] = {}
        self.token_count = 0
        self._real: torch.Tensor | None = None

    def begin_batch(self, batch: LMBatch) -> None:
        real = batch.attention_mask.bool()
        self.token_count += int(real.sum())
        self._real = None if bool(real.all()) else real  # no padding: no gather copy

    def collect(self, spec: ModuleSpec, a: torch.Tensor, s: torch.Tensor) -> None:
        # s is exactly 0 at pads (causal model, right padding): only a needs its pads dropped.
        a2 = a.flatten(0, 1) if self._real is None else a[self._real.to(a.device)]
        s2 = s.flatten(0, 1)
        for sums, x in ((self.a_sums, _cast(a2, self.product_dtype)), (self.s_sums, _cast(s2, self.product_dtype))):
            gram = (x.T @ x).double()
            if spec.name in sums:
                sums[spec.name] += gram
            else:
                sums[spec.name] = gram


class LambdaCollector:
    """Σ over sequences of ``(Q_Sᵀ DW_b Q_A)^∘2`` (m, n) in float64, plus the sequence count.

    The rotation is applied where it is cheaper: to tokens (``s Q_S``, ``a Q_A`` then one
    batched product) for long sequences, or to the per-sequence gradient for short ones.
    """

    def __init__(self, q_a: dict[str, torch.Tensor], q_s: dict[str, torch.Tensor], product_dtype: torch.dtype | None = None):
        self.q_a, self.q_s = q_a, q_s
        self.product_dtype = product_dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.sequence_count = 0
        self._cast_basis: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _basis(self, name: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_A, Q_S)`` in the product dtype, cast once per traversal rather than per batch."""
        if name not in self._cast_basis:
            self._cast_basis[name] = (self.q_a[name].to(device, dtype), self.q_s[name].to(device, dtype))
        return self._cast_basis[name]

    def begin_batch(self, batch: LMBatch) -> None:
        self.sequence_count += batch.size

    def collect(self, spec: ModuleSpec, a: torch.Tensor, s: torch.Tensor) -> None:
        dtype = self.product_dtype or a.dtype
        a, s = _cast(a, dtype), _cast(s, dtype)
        q_a, q_s = self._basis(spec.name, dtype, a.device)
        t, m, n = a.shape[1], s.shape[-1], a.shape[-1]
        if t * (m * m + n * n) <= m * n * (m + n):
            rotated = _per_sequence_gradient(a @ q_a, s @ q_s)
        else:
            rotated = q_s.T @ _per_sequence_gradient(a, s) @ q_a
        # square and sum in at least float32: bf16 products, but no bf16 rounding of Λ's terms
        rotated = rotated.to(torch.promote_types(rotated.dtype, torch.float32))
        squared = rotated.mul_(rotated).sum(0).double()
        if spec.name in self.sums:
            self.sums[spec.name] += squared
        else:
            self.sums[spec.name] = squared


class GradientCollector:
    """Per-sequence gradients ``DW`` (N, m, n) per module, rows in example order."""

    def __init__(self, specs: list[ModuleSpec], n_examples: int, dtype: torch.dtype, device: torch.device):
        self.gradients = {s.name: torch.zeros(n_examples, s.d_out, s.d_in, dtype=dtype, device=device) for s in specs}
        self._index: torch.Tensor | None = None

    def begin_batch(self, batch: LMBatch) -> None:
        self._index = batch.index

    def collect(self, spec: ModuleSpec, a: torch.Tensor, s: torch.Tensor) -> None:
        self.gradients[spec.name][self._index.to(a.device)] = _per_sequence_gradient(a, s).to(self.gradients[spec.name].dtype)


class TokenGradientCollector:
    """Per-sequence gradients in token form: per module ``a`` (N, T, n) and ``s`` (N, T, m),
    T the longest example, rows past an example's length zero; ``s_iᵀ a_i`` is its gradient."""

    def __init__(self, specs: list[ModuleSpec], lengths: list[int], dtype: torch.dtype, device: torch.device):
        t = max(lengths, default=0)
        self.a = {s.name: torch.zeros(len(lengths), t, s.d_in, dtype=dtype, device=device) for s in specs}
        self.s = {s.name: torch.zeros(len(lengths), t, s.d_out, dtype=dtype, device=device) for s in specs}
        self._index: torch.Tensor | None = None
        self._real: torch.Tensor | None = None

    def begin_batch(self, batch: LMBatch) -> None:
        self._index, self._real = batch.index, batch.attention_mask.bool()

    def collect(self, spec: ModuleSpec, a: torch.Tensor, s: torch.Tensor) -> None:
        index, real, t = self._index.to(a.device), self._real.to(a.device)[..., None], a.shape[1]
        self.a[spec.name][index, :t] = (a * real).to(self.a[spec.name].dtype)
        self.s[spec.name][index, :t] = (s * real).to(self.s[spec.name].dtype)


class ScoreCollector:
    """Scores of every sequence against every preconditioned query, per module.

    ``query_vectors[name]``: (Q, m, n) dense, or :class:`LowRankQueries` (factors (Q, m, r) and
    (Q, n, r), contracted per token without forming the matrix). Result ``per_module``:
    (N, Q, M) with M modules in ``specs`` order; ``per_module.sum(-1)`` is the total score. The
    per-sequence gradient of one module lives only for the duration of one contraction. With
    ``per_token`` the (N, Q, T) per-token contributions are kept too (dense vectors: costs Q× a
    forward of each module, analysis only; low-rank: free).
    """

    def __init__(
        self,
        specs: list[ModuleSpec],
        query_vectors: dict[str, "torch.Tensor | LowRankQueries"],
        n_examples: int,
        max_tokens: int = 0,
        per_token: bool = False,
    ):
        first = next(iter(query_vectors.values()))
        n_queries, device = lowrank.n_queries(first), (first.left if isinstance(first, LowRankQueries) else first).device
        self.column = {s.name: i for i, s in enumerate(specs)}
        self.query_flat = {name: v.reshape(n_queries, -1) for name, v in query_vectors.items() if not isinstance(v, LowRankQueries)}
        self.query_vectors = query_vectors
        self.per_module = torch.zeros(n_examples, n_queries, len(specs), dtype=torch.float64, device=device)
        self.per_token = torch.zeros(n_examples, n_queries, max_tokens, dtype=torch.float64, device=device) if per_token else None
        self._index: torch.Tensor | None = None

    def begin_batch(self, batch: LMBatch) -> None:
        self._index = batch.index.to(self.per_module.device)

    def collect(self, spec: ModuleSpec, a: torch.Tensor, s: torch.Tensor) -> None:
        vectors = self.query_vectors[spec.name]
        if isinstance(vectors, LowRankQueries):
            if self.per_token is not None or lowrank.token_path_is_cheaper(vectors, a.shape[0], a.shape[1], s.shape[-1], a.shape[-1]):
                tokens = lowrank.contract(a, s, vectors).double()  # (B, Q, T)
                self.per_module[self._index, :, self.column[spec.name]] = tokens.sum(-1)
                if self.per_token is not None:
                    self.per_token[self._index, :, : a.shape[1]] += tokens
                return
            queries = vectors.dense().to(a.dtype).reshape(vectors.n_queries, -1)  # this module only, this batch only
        else:
            queries = self.query_flat[spec.name].to(a.dtype)
        gradient = _per_sequence_gradient(a, s).reshape(a.shape[0], -1)
        self.per_module[self._index, :, self.column[spec.name]] = (gradient @ queries.T).double()
        if self.per_token is not None:
            projected = torch.einsum("btn,qmn->bqtm", a, self.query_vectors[spec.name].to(a.dtype))
            contributions = torch.einsum("bqtm,btm->bqt", projected, s).double()
            self.per_token[self._index, :, : a.shape[1]] += contributions
