"""Rows that pyarrow cannot store become reject rows, whatever their bytes."""


from msif_assets.lake.inputs import read_corpus_file


def test_lone_surrogates_are_rejected_per_field(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_bytes(
        b'{"doc_id": "ok", "text": "fine \\ud83d\\ude00"}\n'        # 1 a valid pair: kept
        b'{"doc_id": "a", "text": "bad \\ud800 x"}\n'               # 2 text
        b'{"doc_id": "\\udfff", "text": "t"}\n'                     # 3 doc_id
        b'{"doc_id": "c", "text": "t", "src": ["\\ud800"]}\n'       # 4 metadata value
        b'{"doc_id": "d", "text": "t", "\\udc00k": 1}\n'            # 5 metadata key
        b'{"doc_id": "e", "text": "also fine"}\n'                   # 6 kept
    )
    docs, rejects = read_corpus_file(f)
    assert docs.column("doc_id").to_pylist() == ["ok", "e"]
    rows = rejects.to_pylist()
    assert [(r["line"], r["field"]) for r in rows] == [(2, "text"), (3, "doc_id"), (4, "src"), (5, "\\udc00k")]
    assert all("lone surrogate" in r["reason"] for r in rows)
    assert "U+D800" in rows[0]["reason"] and "\\ud800" in rows[0]["raw"]
    rejects.validate(full=True)  # valid UTF-8 Arrow strings


def test_utf16_and_nul_bytes_are_named(tmp_path):
    f = tmp_path / "u.txt"
    f.write_bytes("first line\nsecond line\n".encode("utf-16"))
    docs, rejects = read_corpus_file(f)
    assert docs.num_rows == 0
    assert rejects.num_rows == 3 and all("UTF-16" in r for r in rejects.column("reason").to_pylist())
