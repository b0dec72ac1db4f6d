"""Brute-force float64 references, written independently of the engine's traversal:
one example at a time, real parameter ``.grad`` from autograd, explicit dense matrices."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

VOCAB = 23


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                             max_position_embeddings=32, rotary_pct=0.5, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=8, n_layer=2, n_head=2, n_positions=32, n_inner=16, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=12, max_position_embeddings=32, **common)
    if arch == "bloom":
        return BloomConfig(hidden_size=8, n_layer=2, n_head=2, **common)
    raise ValueError(arch)


ARCHS = ("gpt_neox", "gpt2", "llama", "bloom")


def build_tiny(arch: str, tmp_path, seed: int = 0, dtype=torch.float64) -> nn.Module:
    """A random tiny model, saved and reloaded through ``from_pretrained`` (safetensors)."""
    torch.manual_seed(seed)
    # BLOOM has eager attention only (softmax in float32 even for float64 models: agreement
    # with references capped near 1e-7 where batching changes the order of operations).
    attn = "eager" if arch == "bloom" else "sdpa"
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn)
    for p in model.parameters():  # larger weights than the init scale: non-degenerate gradients
        p.data.normal_(0, 0.3)
    model.save_pretrained(tmp_path / f"{arch}-{seed}", safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(tmp_path / f"{arch}-{seed}", dtype=dtype, attn_implementation=attn).eval()


def perturbed_copy(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    """A 'fine-tuned' model: same architecture, weights moved a little."""
    clone = type(model)(model.config).to(next(model.parameters()).dtype)
    clone.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    for p in clone.parameters():
        p.data += scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return clone.eval()


def random_sequences(n: int, seed: int, low: int = 3, high: int = 9) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=gen)
    return [torch.randint(3, VOCAB, (int(t),), generator=gen).tolist() for t in lengths]


def _matrix_grad(module: nn.Module, transposed: bool, has_bias: bool) -> torch.Tensor:
    w = module.weight.grad
    w = w.T if transposed else w
    return torch.cat([w, module.bias.grad[:, None]], 1) if has_bias else w


def log_prob_of_targets(model: nn.Module, ids: list[int], targets: list[bool]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits, -1)
    return sum(log_probs[t - 1, ids[t]] for t in range(1, len(ids)) if targets[t])


def brute_gradients(model: nn.Module, specs, examples) -> dict[str, torch.Tensor]:
    """Per-example ∇ log p(targets) from parameter ``.grad``: {name: (N, m, n)}."""
    modules = dict(model.named_modules())
    out = {s.name: [] for s in specs}
    for example in examples:
        model.zero_grad()
        log_prob_of_targets(model, list(example.input_ids), list(example.target_mask)).backward()
        for s in specs:
            out[s.name].append(_matrix_grad(modules[s.name], s.transposed, s.has_bias).clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


def brute_covariances(model: nn.Module, specs, examples) -> tuple[dict, dict, int]:
    """Σ_t a aᵀ and Σ_t s sᵀ (data labels), one example at a time, with retained outputs."""
    modules = dict(model.named_modules())
    a_sums = {s.name: 0 for s in specs}
    s_sums = {s.name: 0 for s in specs}
    tokens = 0
    for example in examples:
        inputs, outputs = {}, {}
        hooks = []
        for s in specs:
            def hook(mod, args, out, name=s.name):
                inputs[name] = args[0][0].detach()
                out.retain_grad()
                outputs[name] = out
            hooks.append(modules[s.name].register_forward_hook(hook))
        model.zero_grad()
        log_prob_of_targets(model, list(example.input_ids), list(example.target_mask)).backward()
        for h in hooks:
            h.remove()
        for s in specs:
            a = inputs[s.name]
            if s.has_bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            g = outputs[s.name].grad[0]
            a_sums[s.name] = a_sums[s.name] + a.T @ a
            s_sums[s.name] = s_sums[s.name] + g.T @ g
        tokens += len(example.input_ids)
    model.zero_grad()
    return a_sums, s_sums, tokens


def dense_ekfac_inverse(q_a: torch.Tensor, q_s: torch.Tensor, lambdas: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + λI)⁻¹ for F = (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ, row-major vec of (m, n)."""
    kron = torch.kron(q_s.contiguous(), q_a.contiguous())
    f = kron @ torch.diag(lambdas.reshape(-1)) @ kron.T
    return torch.linalg.inv(f + damping * torch.eye(f.shape[0], dtype=f.dtype))
