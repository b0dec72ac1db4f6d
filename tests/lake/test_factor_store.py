import json

import pytest
import torch

from msif_assets.lake.factor_store import load_tensors, read_metadata, save_tensors


def test_roundtrip_with_metadata(tmp_path):
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    tensors = {
        "layer0.mlp/A": base,
        "layer0.mlp/S_T": base.t(),            # non-contiguous view of the same storage
        "layer0.mlp/row": base[1],             # another view sharing storage
        "counts": torch.tensor([7], dtype=torch.int64),
        "half": torch.ones(2, 2, dtype=torch.bfloat16),
    }
    meta = {"model": "abc123", "modules": json.dumps(["layer0.mlp"]), "damping": "0.1"}
    path = tmp_path / "factors" / "f.safetensors"
    save_tensors(path, tensors, meta)
    loaded, loaded_meta = load_tensors(path)
    assert loaded_meta == meta == read_metadata(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert [p.name for p in path.parent.iterdir()] == ["f.safetensors"]


def test_non_string_metadata_refused_and_old_file_kept(tmp_path):
    path = tmp_path / "f.safetensors"
    save_tensors(path, {"x": torch.zeros(2)}, {"n": "1"})
    with pytest.raises(TypeError, match="metadata"):
        save_tensors(path, {"x": torch.ones(2)}, {"n": 2})  # type: ignore[dict-item]
    tensors, meta = load_tensors(path)
    assert meta == {"n": "1"} and torch.equal(tensors["x"], torch.zeros(2))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "nope.safetensors")
