"""The streaming safetensors writer and the lazy reader, checked against the safetensors library."""

import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from msif_assets.lake.factor_store import (
    MissingArtifactError, StreamingTensorWriter, TensorFile, load_tensors, save_tensors, update_content_digest,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    return {
        "m0::q_a": base,
        "m0::q_a_t": base.t(),  # non-contiguous view sharing storage
        "m0::row": base[1],
        "f32": torch.randn(5, 3, generator=gen),
        "bf16": torch.randn(3, generator=gen).to(torch.bfloat16),  # odd byte count: misaligns what follows
        "i64": torch.arange(7, dtype=torch.int64) - 3,
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4, dtype=torch.float64),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "scalar_i": torch.tensor(-4, dtype=torch.int64),
    }


def read_with_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_save_tensors_round_trips_through_safetensors(tmp_path):
    tensors, meta = sample_tensors(), {"model": "abc", "modules": json.dumps(["m0"]), "empty": ""}
    path = save_tensors(tmp_path / "f.safetensors", tensors, meta)
    got, got_meta = read_with_safetensors(path)
    assert got_meta == meta
    assert_same(got, tensors)
    assert_same(dict(TensorFile(path)), tensors)
    assert sorted(os.listdir(tmp_path)) == ["f.safetensors"]
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert length % 8 == 0  # data starts 8-byte aligned


def test_save_tensors_without_metadata_and_without_tensors(tmp_path):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(2)})
    assert read_with_safetensors(tmp_path / "a.safetensors")[1] == {}
    save_tensors(tmp_path / "b.safetensors", {}, {"kind": "covariance"})
    assert read_with_safetensors(tmp_path / "b.safetensors") == ({}, {"kind": "covariance"})
    assert len(TensorFile(tmp_path / "b.safetensors")) == 0


def test_save_tensors_type_errors(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        save_tensors(tmp_path / "f.safetensors", {"x": torch.ones(2)}, {"n": 2})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="str -> Tensor"):
        save_tensors(tmp_path / "f.safetensors", {"x": [1.0]})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_streaming_writer_in_plan_order(tmp_path):
    tensors = sample_tensors()
    plan = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]  # bf16 before float64: unaligned
    with StreamingTensorWriter(tmp_path / "s.safetensors", plan, {"kind": "test"}) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
        assert not (tmp_path / "s.safetensors").exists()  # published on exit only
    got, meta = read_with_safetensors(tmp_path / "s.safetensors")
    assert meta == {"kind": "test"}
    assert_same(got, tensors)
    assert list(TensorFile(tmp_path / "s.safetensors")) == list(tensors)  # file order = plan order


def _old_file(tmp_path):
    path = tmp_path / "f.safetensors"
    save_tensors(path, {"a": torch.zeros(2, 2), "b": torch.zeros(3)}, {"v": "old"})
    return path


def _assert_old_file_only(tmp_path, path):
    assert sorted(os.listdir(tmp_path)) == [path.name]
    tensors, meta = load_tensors(path)
    assert meta == {"v": "old"} and torch.equal(tensors["a"], torch.zeros(2, 2))


PLAN = [("a", torch.float32, (2, 2)), ("b", torch.float32, (3,))]


@pytest.mark.parametrize(
    "name, tensor, message",
    [
        ("b", torch.ones(3), "expected 'a'"),
        ("a", torch.ones(2, 3), r"plan says torch.float32 \(2, 2\)"),
        ("a", torch.ones(2, 2, dtype=torch.float64), "plan says torch.float32"),
    ],
)
def test_streaming_writer_refuses_out_of_plan_writes(tmp_path, name, tensor, message):
    path = _old_file(tmp_path)
    with pytest.raises(ValueError, match=message):
        with StreamingTensorWriter(path, PLAN, {"v": "new"}) as out:
            out.write(name, tensor)
    _assert_old_file_only(tmp_path, path)


def test_streaming_writer_refuses_writes_beyond_the_plan_and_missing_tensors(tmp_path):
    path = _old_file(tmp_path)
    with pytest.raises(ValueError, match="beyond the plan"):
        with StreamingTensorWriter(path, PLAN[:1]) as out:
            out.write("a", torch.ones(2, 2))
            out.write("b", torch.ones(3))
    with pytest.raises(ValueError, match=r"never written: \['b'\]"):
        with StreamingTensorWriter(path, PLAN) as out:
            out.write("a", torch.ones(2, 2))
    _assert_old_file_only(tmp_path, path)


def test_exception_mid_stream_removes_temp_and_keeps_old_file(tmp_path):
    path = _old_file(tmp_path)
    with pytest.raises(RuntimeError, match="power cut"):
        with StreamingTensorWriter(path, PLAN, {"v": "new"}) as out:
            out.write("a", torch.ones(2, 2))
            assert len(os.listdir(tmp_path)) == 2  # the hidden temp file
            raise RuntimeError("power cut")
    _assert_old_file_only(tmp_path, path)


def test_streaming_writer_bad_plans_and_use_outside_with(tmp_path):
    with pytest.raises(ValueError, match="planned twice"):
        StreamingTensorWriter(tmp_path / "f.safetensors", PLAN + PLAN[:1])
    with pytest.raises(ValueError, match="cannot store"):
        StreamingTensorWriter(tmp_path / "f.safetensors", [("c", torch.complex64, (2,))])
    with pytest.raises(TypeError, match="metadata"):
        StreamingTensorWriter(tmp_path / "f.safetensors", PLAN, {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="inside a `with` block"):
        StreamingTensorWriter(tmp_path / "f.safetensors", PLAN).write("a", torch.ones(2, 2))
    assert not list(tmp_path.iterdir())


def test_tensor_file_reads_each_lookup_from_disk(tmp_path):
    tensors = {"m0::q_a": torch.eye(3, dtype=torch.float64), "m0::lambda": torch.ones(2, 3, dtype=torch.float64),
               "m1::q_a": 2 * torch.eye(4, dtype=torch.float64), "counts": torch.tensor([7])}
    path = save_tensors(tmp_path / "f.safetensors", tensors, {"kind": "factors"})
    tf = TensorFile(path)
    assert tf.metadata == {"kind": "factors"} and len(tf) == 4 and "m0::q_a" in tf and "nope" not in tf
    assert tf.shape("m1::q_a") == (4, 4)
    first = tf["m0::q_a"]
    first.zero_()  # a fresh tensor each time: no cache to corrupt
    assert torch.equal(tf["m0::q_a"], torch.eye(3, dtype=torch.float64))
    q_a = tf.view("q_a")
    assert sorted(q_a) == ["m0", "m1"] and "m0" in q_a and "counts" not in q_a
    assert torch.equal(q_a["m1"], 2 * torch.eye(4, dtype=torch.float64))
    assert list(tf.view("lambda")) == ["m0"]
    with pytest.raises(KeyError):
        tf["nope"]
    with pytest.raises(KeyError):
        q_a["counts"]


def test_tensor_file_keeps_reading_the_file_it_opened(tmp_path):
    path = save_tensors(tmp_path / "f.safetensors", {"x": torch.zeros(3)}, {"v": "1"})
    tf = TensorFile(path)
    save_tensors(path, {"x": torch.ones(3)}, {"v": "2"})  # atomically replaced underneath
    assert torch.equal(tf["x"], torch.zeros(3)) and tf.metadata == {"v": "1"}
    assert torch.equal(TensorFile(path)["x"], torch.ones(3))


def test_tensor_file_reads_files_written_by_safetensors(tmp_path):
    tensors = {k: v.contiguous().clone() for k, v in sample_tensors().items()}
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"m": "x"})
    tf = TensorFile(tmp_path / "f.safetensors")
    assert tf.metadata == {"m": "x"}
    assert_same(dict(tf), tensors)


def test_tensor_file_errors(tmp_path):
    with pytest.raises(MissingArtifactError):
        TensorFile(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        TensorFile(bad)
    path = save_tensors(tmp_path / "f.safetensors", {"x": torch.zeros(4)})
    path.write_bytes(path.read_bytes()[:-4])  # truncated
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        TensorFile(path)


def test_content_digest_is_the_whole_file_digest_data_versions_always_had(tmp_path):
    """The streamed digest equals the one computed from the whole loaded file (how data
    versions were made before streaming), so existing lakes keep their versions."""
    import json

    from msif_assets.defs.automation import safetensors_version

    path = save_tensors(tmp_path / "f.safetensors", sample_tensors(), {"kind": "x", "a": "1"})
    tensors, meta = load_tensors(path)
    whole = hashlib.sha256()
    whole.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        whole.update(name.encode())
        whole.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    streamed = hashlib.sha256()
    update_content_digest(streamed, path)
    assert streamed.hexdigest() == whole.hexdigest()
    assert safetensors_version(path).value == whole.hexdigest()[:24]