"""Model directories: validation, content fingerprints, safe loading.

A model directory is a Hugging Face ``save_pretrained`` folder: ``config.json``,
``*.safetensors`` weights (optionally sharded with ``model.safetensors.index.json``)
and tokenizer files. Weights are loaded with ``use_safetensors=True`` only (never
pickle), from local files only, and ``trust_remote_code`` stays False unless the
caller opts in.

The fine-tuned model may instead be a PEFT adapter directory over the pre-trained one
(``adapters.py``): ``fingerprint_model_dir`` and ``load_model_for_finetune`` take the base for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .adapters import AdapterDirInfo

__all__ = [
    "ModelDirError", "ModelDirInfo", "LoadedModel", "TOKENIZER_FILES",
    "validate_model_dir", "fingerprint_model_dir", "check_finite_weights", "load_causal_lm", "load_model_for_finetune",
]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja",  # chat queries and fine-tuning rows render with it
)
# Files that alone let a tokenizer be built; tokenizer_config.json by itself cannot.
_TOKENIZER_CORE = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

Task = Literal["causal_lm", "sequence_classification"]


class ModelDirError(ValueError):
    """A model directory that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class ModelDirInfo:
    """What validate_model_dir found in a model directory."""

    path: Path
    model_type: str
    architectures: tuple[str, ...]
    task: Task
    weight_files: tuple[str, ...]
    tokenizer_files: tuple[str, ...]


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and the task it was loaded for."""

    model: Any
    tokenizer: Any
    task: Task
    info: ModelDirInfo
    adapter: AdapterDirInfo | None = None  # set when the model is a base with a PEFT adapter merged in


def _task_for(architectures: tuple[str, ...]) -> Task:
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence_classification"
    return "causal_lm"


def validate_model_dir(path: str | os.PathLike[str]) -> ModelDirInfo:
    """Check that ``path`` is a loadable safetensors model directory, or raise ModelDirError."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelDirError(f"model directory {p} does not exist (or is not a directory); "
                            "point to a folder written by save_pretrained()")
    config_path = p / "config.json"
    if not config_path.is_file() and (p / "adapter_config.json").is_file():
        raise ModelDirError(f"{p} is a PEFT adapter directory, not a full model; only finetuned_model may be an "
                            "adapter (merged into pretrained_model), so point this input at a full model folder")
    if not config_path.is_file():
        raise ModelDirError(f"{p}: config.json is missing; save the model with save_pretrained()")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{config_path}: not valid JSON ({exc}); re-save the model config") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelDirError(f"{config_path}: field model_type is missing; re-save the model config")
    weights = tuple(sorted(f.name for f in p.glob("*.safetensors")))
    if not weights:
        pickled = [name for name in _PICKLE_WEIGHTS if (p / name).exists()] + sorted(
            f.name for f in p.glob("pytorch_model-*.bin"))
        if pickled:
            raise ModelDirError(
                f"{p}: only {', '.join(pickled)} found; pickle weights are not loaded for safety — "
                "convert to safetensors (model = AutoModel.from_pretrained(dir); "
                "model.save_pretrained(dir, safe_serialization=True))"
            )
        raise ModelDirError(f"{p}: no *.safetensors weights found; save the model with save_pretrained()")
    tokenizer_files = tuple(name for name in TOKENIZER_FILES if (p / name).is_file())
    if not any(name in tokenizer_files for name in _TOKENIZER_CORE):
        raise ModelDirError(f"{p}: no tokenizer files (e.g. tokenizer.json); "
                            "save the tokenizer into the same folder with tokenizer.save_pretrained(dir)")
    architectures = tuple(a for a in config.get("architectures") or () if isinstance(a, str))
    return ModelDirInfo(path=p.resolve(), model_type=config["model_type"], architectures=architectures,
                        task=_task_for(architectures), weight_files=weights, tokenizer_files=tokenizer_files)


# Per-file content digests, keyed by (path, size, mtime_ns, inode), so a process that
# fingerprints the same large model repeatedly (a sensor) hashes each file once. As in
# git's "racily clean" rule, a file modified in the last few seconds is never cached:
# coarse filesystem timestamps could hide a rewrite within the same tick.
_FILE_DIGESTS: dict[tuple[str, int, int, int], bytes] = {}
_RACY_NS = 3_000_000_000


def _file_digest(path: Path, chunk_bytes: int) -> tuple[int, bytes]:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _FILE_DIGESTS.get(key)
    if cached is not None:
        return st.st_size, cached
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        _FILE_DIGESTS[key] = digest.digest()
    return st.st_size, digest.digest()


def fingerprint_model_dir(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20,
                          base: str | os.PathLike[str] | None = None) -> str:
    """sha256 (hex) over config.json, safetensors weights (+ index) and tokenizer files.

    Stable across copies and mtimes (hashes relative names, sizes and content digests
    in sorted order); changes when any weight, config or tokenizer byte changes. Other
    files (README, training args, optimizer state) do not count. For a PEFT adapter
    directory it is the merged model's id, over ``base`` and the adapter (adapters.py);
    ``base`` is ignored for a full model directory.
    """
    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        from .adapters import fingerprint_adapter_dir  # adapters builds on this module

        return fingerprint_adapter_dir(p, base, chunk_bytes)
    info = validate_model_dir(p)
    names = {"config.json", *info.weight_files, *info.tokenizer_files}
    names.update(f.name for f in p.glob("*.safetensors.index.json"))
    digest = hashlib.sha256()
    for name in sorted(names):
        size, file_digest = _file_digest(p / name, chunk_bytes)
        digest.update(name.encode("utf-8") + b"\0" + size.to_bytes(8, "little") + file_digest)
    return digest.hexdigest()


# Weight files already found finite, keyed like _FILE_DIGESTS (and under the same "racily
# clean" rule), so the steps that each load the same model read its weights for the check once.
_FINITE_FILES: set[tuple[str, int, int, int]] = set()
_MAX_NAMED = 8


def _nonfinite_summary(tensor: Any) -> str | None:
    """``"(3 NaN) first at [1, 0]"`` for a floating tensor with NaN/±Inf values, else None."""
    import torch

    if not tensor.is_floating_point():
        return None
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)  # float8 and other exotic types: isfinite after widening
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    counts = [(int(torch.isnan(tensor).sum()), "NaN"), (int(torch.isposinf(tensor).sum()), "+Inf"),
              (int(torch.isneginf(tensor).sum()), "-Inf")]
    first = [int(i) for i in (~finite).nonzero()[0].tolist()] if tensor.dim() else []
    return "(" + ", ".join(f"{n} {label}" for n, label in counts if n) + ")" + (f" first at {first}" if first else "")


def check_finite_weights(info: ModelDirInfo) -> None:
    """Raise ModelDirError naming every safetensors file and tensor of the model directory
    that holds NaN or ±Inf values (read tensor by tensor; files already found finite are
    remembered by path, size, mtime and inode)."""
    from safetensors import safe_open

    found: list[str] = []
    for name in info.weight_files:
        path = info.path / name
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if key in _FINITE_FILES:
            continue
        bad = []
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for tensor_name in fh.keys():
                summary = _nonfinite_summary(fh.get_tensor(tensor_name))
                if summary:
                    bad.append(f"{tensor_name} {summary}")
        if bad:
            more = f", and {len(bad) - _MAX_NAMED} more tensors" if len(bad) > _MAX_NAMED else ""
            found.append(f"non-finite values in {path}: {', '.join(bad[:_MAX_NAMED])}{more}")
        elif time.time_ns() - st.st_mtime_ns > _RACY_NS:
            _FINITE_FILES.add(key)
    if found:
        raise ModelDirError(
            f"model directory {info.path} has non-finite weights — " + "; ".join(found) + " — "
            "NaN/Inf weights make every score computed with them meaningless (they surface later as "
            "e.g. 'linalg.eigh: The algorithm failed to converge'). The checkpoint is corrupt or its "
            "training diverged: export the model again from a healthy checkpoint (e.g. the last one "
            "before the loss became NaN) with save_pretrained(), or repair the named tensors"
        )


def _load_tokenizer(info: ModelDirInfo, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(info.path), local_files_only=True,
                                         trust_remote_code=trust_remote_code)


def _load(info: ModelDirInfo, task: Task, dtype: Any, device: str | None, trust_remote_code: bool,
          **kwargs: Any) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_finite_weights(info)
    cls = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    model = cls.from_pretrained(str(info.path), dtype=dtype, use_safetensors=True, local_files_only=True,
                                trust_remote_code=trust_remote_code, **kwargs)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return LoadedModel(model=model, tokenizer=_load_tokenizer(info, trust_remote_code), task=task, info=info)


def load_causal_lm(path: str | os.PathLike[str], dtype: Any = None, device: str | None = None,
                   trust_remote_code: bool = False, **kwargs: Any) -> LoadedModel:
    """Load a causal LM and its tokenizer (device defaults to cuda when available).

    ``dtype`` defaults to torch.float32; extra kwargs go to ``from_pretrained``
    (e.g. ``attn_implementation="sdpa"``). It is always passed explicitly: weights stored in
    bfloat16/float16 (as Pythia and Llama are published) are read as stored and upcast — exactly —
    to ``dtype``, whereas transformers' own default (``"auto"``) would keep them in half precision.
    """
    import torch

    info = validate_model_dir(path)
    return _load(info, "causal_lm", dtype or torch.float32, device, trust_remote_code, **kwargs)


def load_model_for_finetune(path: str | os.PathLike[str], dtype: Any = None, device: str | None = None,
                            trust_remote_code: bool = False, base: str | os.PathLike[str] | None = None,
                            **kwargs: Any) -> LoadedModel:
    """Load a fine-tuned model: sequence classification if ``config.architectures``
    names a ``*ForSequenceClassification`` class, else a causal LM. A PEFT adapter
    directory is merged into the pre-trained model at ``base`` (adapters.py)."""
    import torch

    if (Path(path).expanduser() / "adapter_config.json").is_file():
        from .adapters import load_adapter_model  # adapters builds on this module

        return load_adapter_model(path, base, dtype or torch.float32, device, trust_remote_code, **kwargs)
    info = validate_model_dir(path)
    return _load(info, info.task, dtype or torch.float32, device, trust_remote_code, **kwargs)


def load_tokenizer(path: str | os.PathLike[str], trust_remote_code: bool = False) -> tuple[Any, int | None]:
    """The model directory's tokenizer and the model window from its config (no weights loaded)."""
    import json

    info = validate_model_dir(path)
    config = json.loads((info.path / "config.json").read_text(encoding="utf-8"))
    window = config.get("max_position_embeddings") or config.get("n_positions") or config.get("seq_length")
    return _load_tokenizer(info, trust_remote_code), (int(window) if window else None)
