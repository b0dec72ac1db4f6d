"""Tests for RepSim and BM25 baselines on real tiny transformers and the real bm25s library."""

from __future__ import annotations

import bm25s
import numpy as np
import pytest
import torch
import transformers as tf

from msif_assets.engine.baselines import (
    BM25Index,
    mean_pooled_hidden_states,
    representation_similarity,
)
from msif_assets.engine.batching import LMBatch, document_example, make_batches

VOCAB = 64

CONFIGS = {
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64,
    ),
    "llama": lambda: tf.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
    ),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64),
    "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
}
FINAL_NORM = {"gpt_neox": "final_layer_norm", "llama": "norm", "gpt2": "ln_f", "bloom": "ln_f"}


def make_model(arch: str, seed: int, cls=tf.AutoModelForCausalLM, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    # SDPA keeps float64 end to end where the architecture supports it (METHOD.md pitfalls).
    attn = "eager" if arch == "bloom" else "sdpa"
    return cls.from_config(config, dtype=torch.float64, attn_implementation=attn).eval()


def random_sequences(seed: int, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


CAND_SEQS = random_sequences(0, [5, 9, 3, 12, 7])
QUERY_SEQS = random_sequences(1, [6, 11, 4])


def pad_batches(seqs: list[list[int]], batch_size: int, pad_id: int, sort_by_length: bool = True) -> list[LMBatch]:
    """The engine's own batches (``make_batches``; sorted by length, so rows come back out of order)."""
    return list(make_batches([document_example(s) for s in seqs], batch_size, pad_id, sort_by_length))


def reference_repsim(pt, ft, cands, queries) -> np.ndarray:
    """Each sequence alone and unpadded; hidden_states[-1] mean over all its tokens; numpy cosine."""

    def pooled(model, seqs):
        rows = []
        with torch.no_grad():
            for s in seqs:
                out = model(torch.tensor([s]), output_hidden_states=True)
                rows.append(out.hidden_states[-1][0].numpy().mean(axis=0))
        return np.stack(rows)

    c, q = pooled(pt, cands), pooled(ft, queries)
    dots = c @ q.T
    return dots / np.outer(np.sqrt((c * c).sum(1)), np.sqrt((q * q).sum(1)))


# ----------------------------------------------------------------------- batches


def test_unsorted_batches_right_pad_and_keep_order():
    seqs = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    batches = pad_batches(seqs, batch_size=3, pad_id=0, sort_by_length=False)
    assert [b.size for b in batches] == [3, 1]
    assert batches[0].input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batches[0].attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batches[1].input_ids.tolist() == [[11, 12, 13, 14]]
    assert batches[1].attention_mask.tolist() == [[1, 1, 1, 1]]


def test_batches_reject_bad_input():
    with pytest.raises(ValueError, match="no tokens"):
        pad_batches([[1], []], batch_size=2, pad_id=0)
    with pytest.raises(ValueError, match="batch_size"):
        pad_batches([[1]], batch_size=0, pad_id=0)


# ------------------------------------------------------------------------ RepSim


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_repsim_equals_numpy_cosine_of_mean_pooled_hidden_states(arch):
    pt, ft = make_model(arch, seed=0), make_model(arch, seed=1)
    got = representation_similarity(
        pt, ft, pad_batches(CAND_SEQS, 2, pad_id=0), pad_batches(QUERY_SEQS, 2, pad_id=0)
    )
    expected = reference_repsim(pt, ft, CAND_SEQS, QUERY_SEQS)
    assert got.shape == (len(CAND_SEQS), len(QUERY_SEQS))
    assert got.dtype == torch.float64
    # Llama's RMSNorm normalizes in float32 even in a float64 model, so padded vs
    # unpadded runs agree only to ~1e-7.
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)
    # The two models are different, so RepSim must not be symmetric in its roles.
    swapped = reference_repsim(ft, pt, CAND_SEQS, QUERY_SEQS)
    assert np.abs(swapped - expected).max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_repsim_batch_size_invariance(arch):
    pt, ft = make_model(arch, seed=0), make_model(arch, seed=1)
    results = [
        representation_similarity(
            pt, ft, pad_batches(CAND_SEQS, bs, pad_id=0), pad_batches(QUERY_SEQS, bs, pad_id=0)
        )
        for bs in (1, 3, 5)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-6, rtol=0)


def _extra_padding(batch: LMBatch, extra: int, pad_id: int) -> LMBatch:
    b = batch.size
    mask = torch.cat([batch.attention_mask, torch.zeros((b, extra), dtype=torch.long)], dim=1)
    ids = torch.cat([batch.input_ids, torch.full((b, extra), pad_id, dtype=torch.long)], dim=1)
    targets = torch.cat([batch.target_mask, torch.zeros((b, extra), dtype=torch.bool)], dim=1)
    ids[mask == 0] = pad_id
    return LMBatch(ids, mask, targets, batch.index)


def test_repsim_ignores_padding_length_and_pad_token():
    pt, ft = make_model("gpt_neox", seed=0), make_model("gpt_neox", seed=1)
    base = representation_similarity(
        pt, ft, pad_batches(CAND_SEQS, 5, pad_id=0), pad_batches(QUERY_SEQS, 3, pad_id=0)
    )
    padded = representation_similarity(
        pt,
        ft,
        [_extra_padding(b, 7, pad_id=13) for b in pad_batches(CAND_SEQS, 5, pad_id=0)],
        [_extra_padding(b, 4, pad_id=29) for b in pad_batches(QUERY_SEQS, 3, pad_id=0)],
    )
    torch.testing.assert_close(padded, base, atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_final_norm_layer_is_hidden_states_minus_one(arch):
    """The documented claim: in transformers 5.x hidden_states[-1] is post-final-norm for all four."""
    model = make_model(arch, seed=3)
    seq = CAND_SEQS[3]
    with torch.no_grad():
        out = model(torch.tensor([seq]), output_hidden_states=True)
        last = model.base_model(torch.tensor([seq])).last_hidden_state
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], last, atol=0, rtol=0)
    pooled = mean_pooled_hidden_states(model, pad_batches([seq], 1, pad_id=0))
    np.testing.assert_allclose(pooled[0].numpy(), last[0].numpy().mean(0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2", "bloom"])
def test_last_block_layer_is_pre_norm_output(arch):
    model = make_model(arch, seed=4)
    seqs = CAND_SEQS[:3]
    pre = mean_pooled_hidden_states(model, pad_batches(seqs, 3, pad_id=0), layer="last_block")
    post = mean_pooled_hidden_states(model, pad_batches(seqs, 3, pad_id=0), layer="final_norm")
    norm = model.base_model.get_submodule(FINAL_NORM[arch])
    for i, s in enumerate(seqs):
        # Independent route: the final norm's input is the last block's output.
        seen = []
        handle = norm.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
        with torch.no_grad():
            model(torch.tensor([s]))
        handle.remove()
        np.testing.assert_allclose(pre[i].numpy(), seen[-1][0].numpy().mean(0), atol=1e-6, rtol=0)
    assert (pre - post).abs().max() > 1e-3


def test_repsim_with_sequence_classification_ft_model():
    pt = make_model("gpt_neox", seed=0)
    ft = make_model("gpt_neox", seed=2, cls=tf.AutoModelForSequenceClassification, num_labels=3, pad_token_id=0)
    got = representation_similarity(
        pt, ft, pad_batches(CAND_SEQS, 2, pad_id=0), pad_batches(QUERY_SEQS, 2, pad_id=0)
    )
    np.testing.assert_allclose(got.numpy(), reference_repsim(pt, ft, CAND_SEQS, QUERY_SEQS), atol=1e-6, rtol=0)


def test_repsim_uses_eval_mode_and_restores_training_flag():
    pt = make_model("gpt_neox", seed=0, hidden_dropout=0.5, attention_dropout=0.5)
    ft = make_model("gpt_neox", seed=1, hidden_dropout=0.5, attention_dropout=0.5)
    expected = reference_repsim(pt, ft, CAND_SEQS, QUERY_SEQS)  # models are in eval mode here
    pt.train()
    ft.train()
    got = representation_similarity(
        pt, ft, pad_batches(CAND_SEQS, 2, pad_id=0), pad_batches(QUERY_SEQS, 2, pad_id=0)
    )
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)
    assert pt.training and ft.training


def test_repsim_errors():
    pt = make_model("gpt_neox", seed=0)
    wide = tf.AutoModelForCausalLM.from_config(
        tf.GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, vocab_size=VOCAB),
        dtype=torch.float64,
    )
    with pytest.raises(ValueError, match="hidden sizes differ"):
        representation_similarity(pt, wide, pad_batches(CAND_SEQS, 2, 0), pad_batches(QUERY_SEQS, 2, 0))
    with pytest.raises(ValueError, match="no batches"):
        representation_similarity(pt, pt, pad_batches(CAND_SEQS, 2, 0), [])
    with pytest.raises(ValueError, match="layer"):
        mean_pooled_hidden_states(pt, pad_batches(CAND_SEQS, 2, 0), layer="middle")
    with pytest.raises(ValueError, match="index"):
        mean_pooled_hidden_states(pt, pad_batches(CAND_SEQS, 2, 0)[:1])
    with pytest.raises(TypeError, match="LMBatch"):
        mean_pooled_hidden_states(pt, [torch.tensor([CAND_SEQS[0]])])


# -------------------------------------------------------------------------- BM25

CORPUS = {
    "d_hamlet": "Hamlet is a tragedy written by William Shakespeare around 1600.",
    "d_paris": "Paris is the capital and most populous city of France.",
    "d_berlin": "Berlin is the capital of Germany; Berlin has many museums.",
    "d_tokyo": "Tokyo is the capital of Japan.",
    "d_rivers": "The Nile and the Amazon are the longest rivers on Earth.",
    "d_macbeth": "Macbeth, another play by Shakespeare, is shorter than Hamlet.",
}


@pytest.fixture(scope="module")
def index() -> BM25Index:
    return BM25Index.build(list(CORPUS.values()), list(CORPUS))


def test_bm25_ranks_documents_with_query_terms_first(index):
    scores = dict(zip(index.ids, index.scores("Who wrote Hamlet?")))
    with_term = {d for d, text in CORPUS.items() if "hamlet" in text.lower()}
    assert with_term == {"d_hamlet", "d_macbeth"}
    assert min(scores[d] for d in with_term) > 0.0
    assert all(scores[d] == 0.0 for d in CORPUS if d not in with_term)
    # "tragedy" occurs only in d_hamlet, so it must lead; d_macbeth matches "hamlet" only.
    top = index.top_k("Hamlet tragedy", k=2)
    assert top[0][0] == "d_hamlet" and top[1][0] == "d_macbeth"


def test_bm25_agrees_with_bm25s_retrieve(index):
    texts = list(CORPUS.values())
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    for query in ("capital of Germany", "Shakespeare play Hamlet", "longest rivers capital"):
        docs, ref_scores = reference.retrieve(
            bm25s.tokenize([query], stopwords="en", show_progress=False), k=len(texts), show_progress=False
        )
        ref = np.zeros(len(texts))
        ref[docs[0]] = ref_scores[0]
        np.testing.assert_allclose(index.scores(query), ref, rtol=1e-6, atol=0)
        # top_k order agrees wherever scores are distinct (ties are broken by id here).
        ours = index.top_k(query, k=len(texts))
        distinct = [i for i, s in enumerate(ref_scores[0]) if np.sum(ref_scores[0] == s) == 1]
        for i in distinct:
            assert ours[i][0] == list(CORPUS)[docs[0][i]]


def test_bm25_lowercases_and_handles_stopwords(index):
    np.testing.assert_array_equal(index.scores("BERLIN Capital"), index.scores("berlin capital"))
    with pytest.raises(ValueError, match="no BM25 tokens"):
        index.scores("the of and")
    keep = BM25Index.build(list(CORPUS.values()), list(CORPUS), stopwords=None)
    the_scores = dict(zip(keep.ids, keep.scores("the")))
    assert the_scores["d_tokyo"] > 0.0 and the_scores["d_hamlet"] == 0.0


def test_bm25_scores_for_and_ties(index):
    subset = ["d_tokyo", "d_berlin", "d_hamlet"]
    full = dict(zip(index.ids, index.scores("capital Berlin")))
    np.testing.assert_array_equal(index.scores_for("capital Berlin", subset), [full[d] for d in subset])
    twins = BM25Index.build(["red apple", "green pear", "red apple"], ["z", "m", "a"])
    assert [d for d, _ in twins.top_k("apple", k=3)] == ["a", "z", "m"]


def test_bm25_errors(index):
    with pytest.raises(ValueError, match="empty pool"):
        BM25Index.build([], [])
    with pytest.raises(ValueError, match="duplicates"):
        BM25Index.build(["a b", "c d"], ["x", "x"])
    with pytest.raises(ValueError, match="2 texts but 1 ids"):
        BM25Index.build(["aa bb", "cc dd"], ["x"])
    with pytest.raises(ValueError, match="no BM25 tokens"):
        index.scores("")
    with pytest.raises(KeyError, match="not in the index"):
        index.scores_for("capital", ["d_paris", "nope"])
    with pytest.raises(ValueError, match="k must be"):
        index.top_k("capital", k=0)
