"""The lake in a bucket: a real S3-compatible server (moto's standalone server on 127.0.0.1).

Tables, factor files, query blocks, LanceDB and the DuckDB catalog work on ``s3://`` roots; an
interrupted write publishes nothing; and a whole `msif materialize` with the lake in the bucket
gives the influence table a local lake gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from msif_assets.lake import tables
from msif_assets.lake.atomic import atomic_write
from msif_assets.lake.catalog import Catalog
from msif_assets.lake.factor_store import StreamingTensorWriter, TensorFile, load_tensors, save_tensors
from msif_assets.lake.layout import LakeLayout
from msif_assets.lake.storage import LakeStorageError, is_remote, lake_path
from msif_assets.lake.vectors import ChunkVectorStore, with_vectors

from ..defs.byo_world import COMPUTE, make_world
from ..servers import S3Server


@pytest.fixture
def bucket_env(s3: S3Server, monkeypatch) -> str:
    """A fresh bucket, with this process's AWS_* environment pointing at the server."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3.make_bucket(f"lake-{uuid.uuid4().hex[:10]}")


def _chunks(shard: str, n: int) -> pa.Table:
    ids = [f"d{i}" for i in range(n)]
    return pa.table({"shard": [shard] * n, "doc_id": ids, "chunk_id": [f"{d}#0" for d in ids], "chunk_index": [0] * n,
                     "n_chunks": [1] * n, "n_tokens": [2] * n, "token_ids": [[1, 2]] * n, "text": ["x y"] * n})


def _keys(s3: S3Server, bucket: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_uris_are_validated_with_a_message_that_says_what_to_change():
    assert not is_remote(lake_path("/tmp/some/lake")) and lake_path("file:///tmp/x") == Path("/tmp/x")
    assert is_remote(lake_path("s3://bucket/prefix"))
    for bad, why in [("s3://", "name a bucket"), ("s3://b/../x", "'..'"), ("s3://b/p?endpoint=x", "environment"),
                     ("nosuchproto://b/p", "unknown storage protocol")]:
        with pytest.raises(LakeStorageError, match=why):
            lake_path(bad)


def test_a_missing_bucket_is_named_before_any_work(bucket_env, tmp_path):
    from msif_assets.app.cli import main

    with pytest.raises(LakeStorageError, match="bucket 'no-such-bucket' does not exist"):
        Catalog.open("s3://no-such-bucket/lake")
    assert main(["status", "--lake", "s3://no-such-bucket/lake"]) == 2


def test_tables_are_replaced_whole_and_a_rerun_never_duplicates_rows(s3, bucket_env):
    layout = LakeLayout(f"s3://{bucket_env}/lake")
    tables.write_chunks(layout, "s0", _chunks("s0", 3))
    tables.write_chunks(layout, "s0", _chunks("s0", 2))  # a rerun with other content replaces
    tables.write_chunks(layout, "s1", _chunks("s1", 4))
    assert tables.read_chunks(layout, "s0").num_rows == 2
    assert tables.list_partitions(layout.chunks_dir) == [{"shard": "s0"}, {"shard": "s1"}]
    with Catalog.open(layout.root) as catalog:
        assert catalog.query("SELECT count(*) AS n FROM chunks").column("n")[0].as_py() == 6
        assert catalog.query("SELECT count(DISTINCT chunk_id || shard) AS n FROM chunks").column("n")[0].as_py() == 6
    # nothing but the published objects: no temporary keys are left behind
    assert _keys(s3, bucket_env) == ["lake/chunks/shard=s0/part.parquet", "lake/chunks/shard=s1/part.parquet"]


def test_an_interrupted_write_publishes_nothing_and_keeps_the_old_object(s3, bucket_env):
    layout = LakeLayout(f"s3://{bucket_env}/lake")
    path = layout.factors_file("pt", "m1")
    save_tensors(path, {"a": torch.arange(6.0).reshape(2, 3)}, {"v": "old"})
    with pytest.raises(RuntimeError, match="killed"):
        with StreamingTensorWriter(path, [("a", torch.float32, (2, 3)), ("b", torch.float32, (4,))], {"v": "new"}) as out:
            out.write("a", torch.zeros(2, 3))
            raise RuntimeError("killed between two tensors")
    tensors, meta = load_tensors(path)
    assert meta == {"v": "old"} and torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3))
    tables.write_chunks(layout, "s0", _chunks("s0", 1))

    def half_a_file(tmp: Path) -> None:
        tmp.write_bytes(b"PAR1 half of a parquet file")
        raise OSError("killed mid-write")

    with pytest.raises(OSError, match="killed"):
        atomic_write(layout.chunks_file("s0"), half_a_file)
    assert tables.read_chunks(layout, "s0").num_rows == 1
    assert _keys(s3, bucket_env) == ["lake/chunks/shard=s0/part.parquet", "lake/factors/pt/m1/factors.safetensors"]


def test_factor_files_are_read_tensor_by_tensor_with_ranged_reads(bucket_env):
    path = LakeLayout(f"s3://{bucket_env}/lake").factors_file("ft", "m2")
    expected = {"big": torch.randn(64, 32, dtype=torch.float64), "small": torch.arange(5, dtype=torch.int64)}
    save_tensors(path, expected, {"kind": "test"})
    with TensorFile(path) as tf:
        assert tf.metadata == {"kind": "test"} and tf.shape("big") == (64, 32)
        assert torch.equal(tf["big"], expected["big"]) and torch.equal(tf["small"], expected["small"])


def test_embeddings_live_in_lancedb_in_the_bucket(bucket_env):
    store = ChunkVectorStore(LakeLayout(f"s3://{bucket_env}/lake").embeddings_dir)
    rows = pa.table({"shard": ["s0", "s0"], "chunk_id": ["a#0", "b#0"], "doc_id": ["a", "b"], "text": ["x", "y"]})
    vectors = np.eye(2, 4, dtype=np.float32)
    store.replace_shard("s0", with_vectors(rows, vectors))
    store.replace_shard("s0", with_vectors(rows, vectors))
    assert store.count() == 2 and store.shards() == ["s0"]


def _write_config(root: Path, inputs: dict[str, str], lake: str) -> Path:
    lines = ["[lake]", f'root = "{lake}"', "[inputs]"] + [f'{k} = "{v}"' for k, v in inputs.items()]
    lines += ["[compute]"] + [f"{k} = {json.dumps(v)}" for k, v in COMPUTE.items()]
    path = root / f"msif-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _materialize(config: Path, home: Path, env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MSIF_CONFIG", "MSIF_LAKE")}
    done = subprocess.run([sys.executable, "-m", "msif_assets.app.cli", "materialize", "--config", str(config)],
                          env={**clean, **env, "DAGSTER_HOME": str(home)}, cwd=config.parent,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done.stdout


def _influence(lake: str) -> pa.Table:
    with Catalog.open(lake) as catalog:
        return catalog.query("SELECT query_id, shard, chunk_id, method, damping_kind, damping, score FROM influence "
                             "ORDER BY ALL")


def test_a_whole_materialization_in_the_bucket_equals_a_local_lake(s3: S3Server, bucket_env, tmp_path):
    inputs = make_world(tmp_path / "world", n_shards=2)
    local = _write_config(tmp_path, inputs, str(tmp_path / "local-lake"))
    remote_root = f"s3://{bucket_env}/msif"
    remote = _write_config(tmp_path, inputs, remote_root)
    _materialize(local, tmp_path / "home-local", {})
    _materialize(remote, tmp_path / "home-s3", s3.env())

    want, got = _influence(str(tmp_path / "local-lake")), _influence(remote_root)
    assert got.num_rows == want.num_rows > 0
    assert got.drop_columns(["score"]).equals(want.drop_columns(["score"]))
    np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), rtol=1e-6, atol=1e-9)
    keys = _keys(s3, bucket_env)
    assert not [k for k in keys if k.endswith(".tmp") or "/.staging/" in k], keys
    assert any(k.endswith("blocks.json") for k in keys), "query blocks are published by their marker"

    again = _materialize(remote, tmp_path / "home-s3", s3.env())  # idempotent: nothing to do, nothing duplicated
    assert "0 asset partitions" in again, again[-2000:]
    assert _influence(remote_root).equals(got)
