"""Each head block is one real (head, q/k/v): moving a block's weight rows moves exactly one
head of exactly one of the attention's q, k, v tensors, and nothing else."""

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from msif_assets.engine import discover_modules

from .reference import ARCHS, build_tiny


def _capture_qkv(model, arch, input_ids):
    """q, k, v of the first layer as (heads, T, head_dim) each, straight from the attention."""
    seen = {}
    if arch == "bloom":
        attention = model.transformer.h[0].self_attention
        original = attention._reshape

        def probe(fused):
            q, k, v = original(fused)
            seen.setdefault("qkv", (q, k, v))
            return q, k, v

        attention._reshape = probe
        try:
            model(input_ids=input_ids)
        finally:
            del attention._reshape
        return [t[0].detach() for t in seen["qkv"]]
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def probe(module, query, key, value, *args, **kwargs):
        seen.setdefault("qkv", (query, key, value))
        return original(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("sdpa", probe)
    try:
        model(input_ids=input_ids)
    finally:
        ALL_ATTENTION_FUNCTIONS.register("sdpa", original)
    return [t[0].detach() for t in seen["qkv"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_block_is_one_head_of_one_projection(arch, tmp_path):
    model = build_tiny(arch, tmp_path)
    ids = torch.tensor([[4, 9, 13, 7, 5]])
    base = _capture_qkv(model, arch, ids)
    modules = dict(model.named_modules())
    layer0 = [s for s in discover_modules(model) if s.layer_index == 0 and s.head_blocks]
    seen_blocks = set()
    for spec in layer0:
        weight = modules[spec.name].weight
        for start, stop in spec.head_blocks:
            with torch.no_grad():
                saved = weight.detach().clone()
                if spec.transposed:
                    weight[:, start:stop] += 0.5
                else:
                    weight[start:stop] += 0.5
            moved = _capture_qkv(model, arch, ids)
            with torch.no_grad():
                weight.copy_(saved)
            changed = [
                (role, head)
                for role, (before, after) in enumerate(zip(base, moved))
                for head in range(before.shape[0])
                if not torch.allclose(before[head], after[head])
            ]
            assert len(changed) == 1, (spec.name, start, changed)
            seen_blocks.add(changed[0])
    n_q, n_kv = base[0].shape[0], base[1].shape[0]
    assert seen_blocks == {(0, h) for h in range(n_q)} | {(r, h) for r in (1, 2) for h in range(n_kv)}
