"""The factor steps stream one module at a time: the files they write hold exactly (torch.equal)
what the in-memory path computes, factor files are read lazily, and streaming a factor-like
file keeps the peak memory far below the file's size."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from msif_assets.engine import (
    EkfacFactors, FactorMetadata, ModuleSpec, assemble_factors, discover_modules, document_example, eigendecompose,
    factor_metadata, fit_covariance, fit_factors, fit_lambdas,
)
from msif_assets.engine.factors import BASIS_KEYS, FACTOR_KEYS, factor_file_metadata, specs_to_json
from msif_assets.lake import factor_store
from msif_assets.lake.factor_store import StreamingTensorWriter, load_tensors, read_metadata, update_content_digest
from msif_assets.lake.layout import LakeLayout
from msif_assets.lake.training_inputs import read_finetune_file
from msif_assets.pipeline import factors as pf
from msif_assets.pipeline.models import ModelIds, load_finetuned
from msif_assets.pipeline.settings import ComputeSettings
from tests.defs.byo_world import make_world
from tests.engine.reference import ARCHS, build_tiny, random_sequences

IDS = ModelIds("0123456789abcdef", "fedcba9876543210")


def assert_factors_equal(got: EkfacFactors, want: EkfacFactors) -> None:
    assert got.specs == want.specs and got.metadata == want.metadata
    assert got.eigenbasis.split_heads == want.eigenbasis.split_heads
    for name in want.names:
        g, w = got.module_tensors(name), want.module_tensors(name)
        for key, tensor in w.items():
            assert g[key].dtype == tensor.dtype and torch.equal(g[key].cpu(), tensor.cpu()), key


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_pretrained_steps_match_in_memory_factors(tmp_path, arch, split):
    model = build_tiny(arch, tmp_path)
    specs = discover_modules(model)
    settings = ComputeSettings(split_heads=split, batch_size=3)
    layout = LakeLayout(tmp_path / "lake")
    data = {"s0": random_sequences(5, seed=1), "empty": [], "s1": random_sequences(4, seed=2)}  # a shard without tokens
    examples = {s: [document_example(ids) for ids in seqs] for s, seqs in data.items()}
    args = {s: settings.factor_args(pad_id=0, seed_offset=pf.shard_seed(s)) for s in data}
    covs = {s: fit_covariance(model, specs, examples[s], args[s]) for s in data}
    for s, cov in covs.items():
        pf.save_covariance(layout.factor_stats_file("pt", IDS.pt, f"{s}.covariance"), cov, {"shard": s, "specs": specs_to_json(specs)})

    path, tokens, got_specs = pf.build_eigenbasis(layout, IDS, list(data), settings)
    merged = pf.merge_all(list(covs.values()))
    basis = eigendecompose(merged, specs, split)
    assert (tokens, got_specs) == (merged.token_count, specs)
    meta = read_metadata(path)
    assert (meta["token_count"], meta["shards"], meta["kind"], json.loads(meta["split_heads"])) == (str(tokens), "s0,empty,s1", "eigenbasis", split)
    stored = pf.load_eigenbasis(path)
    for key in BASIS_KEYS:
        for s in specs:
            assert torch.equal(getattr(stored, key)[s.name], getattr(basis, key)[s.name]), (key, s.name)

    lams = {s: fit_lambdas(model, specs, stored, examples[s], args[s]) for s in data}  # over the lazily read basis
    for s, lam in lams.items():
        pf.save_lambda(layout.factor_stats_file("pt", IDS.pt, f"{s}.lambda"), lam, {"shard": s})
    factors_path, factors = pf.assemble_pretrained_factors(layout, IDS, list(data), settings)
    lam = pf.merge_all(list(lams.values()))
    want = assemble_factors(specs, basis, lam, factor_metadata(specs, settings.factor_args(pad_id=0), merged, lam, IDS.pt, settings.scope))
    assert_factors_equal(factors, want)
    assert_factors_equal(pf.load_factors(factors_path).select(want.names), want)
    assert_factors_equal(EkfacFactors.from_tensors(*load_tensors(factors_path)), want)


def test_finetuned_step_matches_in_memory_factors(tmp_path):
    inputs = make_world(tmp_path)
    pt_dir, ft_dir, data_file = (Path(inputs[k]) for k in ("pretrained_model", "finetuned_model", "finetune_data"))
    settings = ComputeSettings(batch_size=4)  # float32 model, stats_dtype auto
    ids = ModelIds.of(pt_dir, ft_dir)
    layout = LakeLayout(tmp_path / "lake")
    path, factors = pf.fit_finetuned_step(layout, pt_dir, ft_dir, data_file, ids, settings)
    assert path == layout.factors_file("ft", ids.ft)
    # the covariance and eigenbasis files were scratch (~9 GB each at 410M): removed once used
    assert not layout.factor_stats_file("ft", ids.ft, "covariance").exists()
    assert not layout.factors_file("ft", ids.ft, "eigenbasis").exists()
    assert read_metadata(path)["specs"]

    ft = load_finetuned(ft_dir, settings)
    specs = discover_modules(ft.model, settings.scope)
    want = pf.fit_finetuned_factors(ft, specs, pf.finetune_examples(read_finetune_file(data_file), ft), settings, ids.ft)
    assert_factors_equal(factors, want)
    assert_factors_equal(pf.load_factors(path), want)


def test_statistics_over_different_modules_refuse_to_merge(tmp_path):
    a = [{"m0": torch.ones(2, 2)}, {}, {"m1": torch.ones(2, 2)}]
    spec = ModuleSpec("m0", "mlp", "mlp", 2, 2, False, False, None)
    with pytest.raises(ValueError, match="different modules"):
        pf.write_eigenbasis(tmp_path / "e.safetensors", a, a, 3, [spec], True, {})
    assert not list(tmp_path.iterdir())


def test_load_factors_is_lazy_and_select_materializes(tmp_path, monkeypatch):
    model = build_tiny("gpt_neox", tmp_path)
    specs = discover_modules(model)
    want = fit_factors(model, specs, [document_example(ids) for ids in random_sequences(6, seed=4)])
    path = tmp_path / "factors.safetensors"
    pf.save_factors(path, want)

    reads: list[str] = []
    read = factor_store.TensorFile.__getitem__
    monkeypatch.setattr(factor_store.TensorFile, "__getitem__", lambda self, name: reads.append(name) or read(self, name))
    lazy = pf.load_factors(path)
    assert reads == [] and lazy.names == want.names and lazy.metadata == want.metadata
    name = want.names[1]
    assert torch.equal(lazy.lambdas[name], want.lambdas[name]) and reads == [f"{name}::lambda"]
    reads.clear()
    one = lazy.select([name])
    assert sorted(reads) == sorted(f"{name}::{key}" for key in FACTOR_KEYS)
    assert one.names == [name] and isinstance(one.lambdas, dict) and isinstance(one.eigenbasis.q_a, dict)
    assert_factors_equal(one, want.select([name]))
    assert_factors_equal(lazy.select(reversed(lazy.names)), want)  # spec order kept
    assert_factors_equal(lazy.to("cpu"), want)
    with pytest.raises(KeyError, match="nope"):
        lazy.select(["nope"])
    with pytest.raises(KeyError):
        lazy.lambdas["nope"]


# -- peak memory: streaming a factor-like file vs loading it whole ---------------------------

D, N_MODULES = 2048, 8  # q_a, q_s and Λ of 2048 × 2048 float64: 32 MiB each, ~770 MiB per file
# every tensor is summed: safetensors maps files, so only pages touched count in the RSS

PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from msif_assets.engine import EkfacFactors
    from msif_assets.lake.factor_store import load_tensors
    from msif_assets.pipeline import factors as pf
    from safetensors.torch import save_file

    mode, src, dst = sys.argv[1:]

    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    # ru_maxrss survives fork + exec (a child of a big pytest process starts at its parent's
    # peak), so reset the kernel's high-water mark here and read VmHWM instead
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status_kib("VmRSS") * 1024
    peak = lambda: status_kib("VmHWM") * 1024
    if mode == "stream":
        factors = pf.load_factors(Path(src))
        total = 0.0
        for name in factors.names:  # one module in memory at a time
            one = factors.select([name])
            total += sum(float(t.sum()) for t in one.module_tensors(name).values())
            del one
        pf.write_factors(Path(dst), factors.specs, factors.eigenbasis, [factors.lambdas], 1, factors.metadata)
    else:  # what the steps used to do: load the whole file, assemble in memory, save through save_file
        factors = EkfacFactors.from_tensors(*load_tensors(src))
        total = sum(float(t.sum()) for n in factors.names for t in factors.module_tensors(n).values())
        lambdas = {n: factors.lambdas[n] / 1 for n in factors.names}
        tensors, meta = EkfacFactors(factors.specs, factors.eigenbasis, lambdas, factors.metadata).to_tensors()
        save_file(tensors, dst, metadata=meta)
    print(json.dumps({"increase": peak() - before, "total": total}))
""")


def _factor_like_file(path: Path) -> tuple[int, float]:
    specs = [ModuleSpec(f"layers.{i}.mlp", "mlp", "mlp", D, D, False, False, None) for i in range(N_MODULES)]
    meta = FactorMetadata("fp", "sampled", True, "all", 100, 10, 0, modules=tuple(s.name for s in specs))
    shapes = {"q_a": (D, D), "eig_a": (D,), "q_s": (D, D), "eig_s": (D,), "lambda": (D, D)}
    plan = [(f"{s.name}::{k}", torch.float64, shapes[k]) for s in specs for k in FACTOR_KEYS]
    gen, total = torch.Generator().manual_seed(0), 0.0
    with StreamingTensorWriter(path, plan, factor_file_metadata(meta, specs)) as out:
        for name, dtype, shape in plan:
            tensor = torch.rand(shape, generator=gen, dtype=dtype)
            total += float(tensor.sum())
            out.write(name, tensor)
    return path.stat().st_size, total


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    update_content_digest(digest, path)
    return digest.hexdigest()


def _probe(mode: str, src: Path, dst: Path) -> dict:
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", PROBE, mode, str(src), str(dst)], cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_streaming_peak_memory_stays_far_below_the_file_size(tmp_path):
    src = tmp_path / "factors.safetensors"
    size, total = _factor_like_file(src)
    streamed = _probe("stream", src, tmp_path / "streamed.safetensors")
    whole = _probe("whole", src, tmp_path / "whole.safetensors")
    for result in (streamed, whole):
        assert result["total"] == pytest.approx(total, rel=1e-12)
    assert _digest(tmp_path / "streamed.safetensors") == _digest(src) == _digest(tmp_path / "whole.safetensors")
    mib = {k: round(v["increase"] / 2**20) for k, v in (("streamed", streamed), ("whole", whole))} | {"file": round(size / 2**20)}
    assert whole["increase"] > 0.9 * size, mib  # the probe sees whole-file loading
    assert streamed["increase"] < 0.4 * size, mib
