"""The engine's public verbs: fit factors, take query gradients, precondition, score.

Typical use (a notebook needs nothing else)::

    specs = shared_modules(pt_model, ft_model)
    pt = fit_factors(pt_model, specs, [document_example(ids) for ids in corpus_chunks])
    ft = fit_factors(ft_model, specs, [query_example(p, c) for p, c in finetune_pairs])
    grads = sequence_gradients(ft_model, specs, [query_example(p, c) for p, c in queries])
    v = preconditioned_queries("ms-if", grads, pt, ft, Damping("relative", 0.1))
    scores = score_examples(pt_model, specs, v, [document_example(ids) for ids in candidates])
    scores.total  # (N candidates, Q queries)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .batching import LMExample, make_batches
from .collectors import CovarianceCollector, GradientCollector, LambdaCollector, ScoreCollector, TokenGradientCollector
from .factored import TokenGradients
from .factors import CovarianceStats, Eigenbasis, EkfacFactors, FactorMetadata, LambdaStats, assemble_factors, eigendecompose
from .modules import ModuleSpec
from .objectives import LabelSource
from .precondition import Damping, precondition
from .traversal import model_device, traverse

METHODS: tuple[str, ...] = ("ms-if", "ss-if", "gdp")


@dataclass(frozen=True)
class FactorArgs:
    """How factors are fitted. ``labels="sampled"`` (default) is the true Fisher (= GGN for
    softmax cross-entropy); ``"data"`` is the empirical Fisher. The covariance pass draws with
    ``seed`` and the Λ pass with ``seed + 1``.

    ``stats_dtype``: precision of the d²-per-token products (covariances, eigenbasis
    rotations); forward and backward always run in the model's dtype and sums accumulate in
    float64. ``auto`` uses bfloat16 for a float32 model on hardware with fast bfloat16 GEMMs
    (CUDA with bf16, CPUs with AVX512-BF16/AMX), else the model's dtype; ``model`` never
    lowers precision (float64 references always use it)."""

    labels: LabelSource = "sampled"
    seed: int = 0
    split_heads: bool = True
    batch_size: int = 8
    pad_id: int = 0
    stats_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.stats_dtype not in ("auto", "model", "bfloat16"):
            raise ValueError(f"stats_dtype={self.stats_dtype!r}; choose 'auto', 'model' or 'bfloat16'")
        if self.labels not in ("sampled", "data"):
            raise ValueError(f"labels={self.labels!r}; choose 'sampled' (true Fisher) or 'data' (empirical Fisher)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def product_dtype(model: nn.Module, stats_dtype: str) -> torch.dtype | None:
    """The dtype of the statistics' products, or None for the model's own dtype."""
    model_dtype = next(model.parameters()).dtype
    if stats_dtype == "model" or model_dtype == torch.float64:
        return None
    if stats_dtype == "bfloat16":
        return torch.bfloat16
    device = model_device(model)
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.bfloat16 if fast and model_dtype == torch.float32 else None


def _n_batches(examples: Sequence[LMExample], batch_size: int) -> int:
    return -(-len(examples) // batch_size)


def fit_covariance(
    model: nn.Module, specs: list[ModuleSpec], examples: Sequence[LMExample], args: FactorArgs = FactorArgs()
) -> CovarianceStats:
    """Σ a aᵀ, Σ s sᵀ and the token count over ``examples`` (one partition of the data)."""
    collector = CovarianceCollector(specs, product_dtype(model, args.stats_dtype))
    batches = make_batches(examples, args.batch_size, args.pad_id)
    traverse(model, specs, batches, collector, args.labels, args.seed, "covariance", _n_batches(examples, args.batch_size))
    return CovarianceStats(collector.a_sums, collector.s_sums, collector.token_count)


def fit_lambdas(
    model: nn.Module,
    specs: list[ModuleSpec],
    basis: Eigenbasis,
    examples: Sequence[LMExample],
    args: FactorArgs = FactorArgs(),
) -> LambdaStats:
    """Σ_sequences (Q_Sᵀ DW Q_A)^∘2 over ``examples`` (one partition of the data)."""
    # the basis may be read lazily from its file: the collector moves and casts one module at a time
    collector = LambdaCollector(basis.q_a, basis.q_s, product_dtype(model, args.stats_dtype))
    batches = make_batches(examples, args.batch_size, args.pad_id)
    traverse(model, specs, batches, collector, args.labels, args.seed + 1, "eigenvalue correction", _n_batches(examples, args.batch_size))
    return LambdaStats(collector.sums, collector.sequence_count)


def factor_metadata(
    specs: list[ModuleSpec], args: FactorArgs, cov: CovarianceStats, lam: LambdaStats, fingerprint: str = "", scope: str = "all"
) -> FactorMetadata:
    return FactorMetadata(
        model_fingerprint=fingerprint,
        labels=args.labels,
        split_heads=args.split_heads,
        scope=scope,
        token_count=cov.token_count,
        sequence_count=lam.sequence_count,
        seed=args.seed,
        stats_dtype=args.stats_dtype,
        modules=tuple(s.name for s in specs),
    )


def fit_factors(
    model: nn.Module,
    specs: list[ModuleSpec],
    examples: Sequence[LMExample],
    args: FactorArgs = FactorArgs(),
    fingerprint: str = "",
    scope: str = "all",
) -> EkfacFactors:
    """Covariances → eigendecompositions → corrected eigenvalues, in one call."""
    cov = fit_covariance(model, specs, examples, args)
    basis = eigendecompose(cov, specs, args.split_heads)
    lam = fit_lambdas(model, specs, basis, examples, args)
    return assemble_factors(specs, basis, lam, factor_metadata(specs, args, cov, lam, fingerprint, scope))


def sequence_gradients(
    model: nn.Module,
    specs: list[ModuleSpec],
    examples: Sequence[LMExample],
    batch_size: int = 8,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-sequence gradients of ``log p(targets)`` (data labels): ``{name: (N, m, n)}``.

    For queries this is ``∇f(q)`` with f = log p(completion | prompt) (or log p(label | text)).
    """
    dtype = next(model.parameters()).dtype
    collector = GradientCollector(specs, len(examples), dtype, model_device(model))
    traverse(model, specs, make_batches(examples, batch_size, pad_id), collector, "data", 0, "query gradients")
    return collector.gradients


def token_gradients(
    model: nn.Module,
    specs: list[ModuleSpec],
    examples: Sequence[LMExample],
    batch_size: int = 8,
    pad_id: int = 0,
) -> dict[str, TokenGradients]:
    """The same gradients as :func:`sequence_gradients`, kept in token form (T(m + n) numbers
    per example and module instead of m·n): ``{name: TokenGradients}`` with a (N, T, n), s (N, T, m)."""
    dtype = next(model.parameters()).dtype
    collector = TokenGradientCollector(specs, [len(e.input_ids) for e in examples], dtype, model_device(model))
    traverse(model, specs, make_batches(examples, batch_size, pad_id), collector, "data", 0, "query gradients")
    return {s.name: TokenGradients(collector.a[s.name], collector.s[s.name]) for s in specs}


def preconditioned_queries(
    method: str,
    query_gradients: dict[str, torch.Tensor],
    pt_factors: EkfacFactors | None = None,
    ft_factors: EkfacFactors | None = None,
    damping: Damping = Damping(),
    ft_damping: Damping | None = None,
) -> dict[str, torch.Tensor]:
    """``ms-if``: P_pt(P_ft ∇f) (score against θ_pt candidates); ``ss-if``: P_ft ∇f (score
    against θ_ft candidates); ``gdp``: ∇f unchanged (θ_pt candidates). ``ft_damping`` defaults
    to ``damping``; relative damping resolves against each model's own Λ."""
    if method == "gdp":
        return {k: v.clone() for k, v in query_gradients.items()}
    if ft_factors is None:
        raise ValueError(f"{method} needs fine-tuned factors")
    vectors = precondition(ft_factors, query_gradients, ft_damping or damping)
    if method == "ss-if":
        return vectors
    if method != "ms-if":
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    if pt_factors is None:
        raise ValueError("ms-if needs pre-trained factors")
    return precondition(pt_factors, vectors, damping)


@dataclass
class Scores:
    """``per_module`` (N, Q, M); ``total`` (N, Q) = its sum over modules; ``per_token``
    (N, Q, T) when requested (sums over T to ``total``)."""

    specs: list[ModuleSpec]
    per_module: torch.Tensor
    per_token: torch.Tensor | None = None
    total: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = self.per_module.sum(-1)

    def group_total(self, group: str) -> torch.Tensor:
        """(N, Q) summed over the modules of one group ("mlp" or "attn")."""
        columns = [i for i, s in enumerate(self.specs) if s.group == group]
        return self.per_module[..., columns].sum(-1)

    def layer_totals(self) -> dict[int, torch.Tensor]:
        layers = sorted({s.layer_index for s in self.specs})
        return {
            layer: self.per_module[..., [i for i, s in enumerate(self.specs) if s.layer_index == layer]].sum(-1)
            for layer in layers
        }


def score_examples(
    model: nn.Module,
    specs: list[ModuleSpec],
    query_vectors: dict[str, torch.Tensor],
    examples: Sequence[LMExample],
    batch_size: int = 8,
    pad_id: int = 0,
    per_token: bool = False,
) -> Scores:
    """``score[z, q] = Σ_modules ⟨V_q, ∇log p(z)⟩`` for all candidates and queries in one pass.

    ``query_vectors[name]``: (Q, m, n), e.g. from ``preconditioned_queries`` (stack several
    methods along Q to score them all in the same pass). Candidates need one forward+backward.
    """
    device = model_device(model)
    vectors = {s.name: query_vectors[s.name].to(device) for s in specs}  # dense (Q, m, n) or LowRankQueries
    max_tokens = max((len(e.input_ids) for e in examples), default=0)
    collector = ScoreCollector(specs, vectors, len(examples), max_tokens, per_token)
    traverse(model, specs, make_batches(examples, batch_size, pad_id), collector, "data", 0, "scoring", _n_batches(examples, batch_size))
    return Scores(specs, collector.per_module, collector.per_token)
