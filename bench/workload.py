"""The benchmark workload: a randomly initialised GPT-NeoX and random token data.

Everything is a deterministic function of a :class:`Workload` (sizes, seeds), so two runs —
or our engine and kronfluence inside one run — see bit-identical models and batches.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif_assets.engine import LMExample, document_example, query_example


@dataclass(frozen=True)
class Workload:
    """Sizes of the model and data sets of one benchmark run.

    ``n_fit`` sequences of ``seq_len`` tokens fit the (pre-trained) factors; ``n_ft_fit`` fit the
    second factor set (the perturbed "fine-tuned" copy) that MS-IF needs; ``n_candidates``
    documents of ``seq_len`` tokens are scored against ``n_queries`` queries of
    ``prompt_len`` + ``completion_len`` tokens.
    """

    name: str = "standard"
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    mlp: int = 1024
    vocab: int = 4096
    seq_len: int = 128
    n_fit: int = 1024
    n_ft_fit: int = 256
    n_candidates: int = 512
    n_queries: int = 16
    prompt_len: int = 32
    completion_len: int = 8
    batch_size: int = 16
    damping: float = 1e-3  # absolute λ, the same for both engines
    ft_perturbation: float = 0.01  # relative size of the θ_ft − θ_pt perturbation
    dtype: str = "float32"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def fit_tokens(self) -> int:
        return self.n_fit * self.seq_len


STANDARD = Workload()
"""The standard CPU workload of the "Performance" issue."""

QUICK = replace(
    STANDARD, name="quick", layers=2, hidden=64, heads=2, mlp=256, vocab=512, seq_len=32,
    n_fit=64, n_ft_fit=32, n_candidates=48, n_queries=4, prompt_len=8, completion_len=4, batch_size=8,
)
"""A smoke run: every phase, both engines, well under a minute on two cores."""

TINY = replace(
    QUICK, name="tiny", layers=1, hidden=32, mlp=64, vocab=128, seq_len=16, n_fit=32, n_ft_fit=16,
    n_candidates=16, n_queries=3, prompt_len=6, completion_len=3, batch_size=8,
)
"""The unit-test workload (seconds)."""

GPU = replace(
    STANDARD, name="gpu", layers=8, hidden=1024, heads=16, mlp=4096, vocab=32768, seq_len=512,
    n_fit=4096, n_ft_fit=1024, n_candidates=2048, n_queries=64, prompt_len=128, completion_len=32, batch_size=32,
)
"""Scaled-up workload picked automatically when CUDA is available (≈ a 100M-parameter model)."""

PRESETS: dict[str, Workload] = {w.name: w for w in (STANDARD, QUICK, TINY, GPU)}


def build_model(w: Workload, device: torch.device | str = "cpu") -> GPTNeoXForCausalLM:
    """A random-init GPT-NeoX (eval mode; SDPA attention) in ``w.dtype``."""
    config = GPTNeoXConfig(
        vocab_size=w.vocab,
        hidden_size=w.hidden,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        intermediate_size=w.mlp,
        max_position_embeddings=max(w.seq_len, w.prompt_len + w.completion_len),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(w.seed)
    model = GPTNeoXForCausalLM(config).to(device=device, dtype=getattr(torch, w.dtype))
    return model.eval()


def perturbed_copy(model: nn.Module, relative: float, seed: int) -> nn.Module:
    """A stand-in "fine-tuned" model: every tensor moved by ``relative`` × its own RMS."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
            p.add_(relative * p.float().pow(2).mean().sqrt().to(p.dtype) * noise)
    return clone.eval()


def _tokens(n: int, length: int, vocab: int, generator: torch.Generator) -> list[list[int]]:
    # ids 3.. keep pad (0), bos (1) and eos (2) out of the data
    return torch.randint(3, vocab, (n, length), generator=generator).tolist()


@dataclass(frozen=True)
class Data:
    """The example lists of one run (all documents have the same length: no padding)."""

    fit: list[LMExample]
    ft_fit: list[LMExample]
    candidates: list[LMExample]
    queries: list[LMExample]


def build_data(w: Workload) -> Data:
    generator = torch.Generator().manual_seed(w.seed + 1000)
    fit = [document_example(t) for t in _tokens(w.n_fit, w.seq_len, w.vocab, generator)]
    ft_fit = [document_example(t) for t in _tokens(w.n_ft_fit, w.seq_len, w.vocab, generator)]
    candidates = [document_example(t) for t in _tokens(w.n_candidates, w.seq_len, w.vocab, generator)]
    prompts = _tokens(w.n_queries, w.prompt_len, w.vocab, generator)
    completions = _tokens(w.n_queries, w.completion_len, w.vocab, generator)
    queries = [query_example(p, c) for p, c in zip(prompts, completions)]
    return Data(fit, ft_fit, candidates, queries)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
