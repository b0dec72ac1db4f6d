"""PEFT adapter directories (LoRA and the other weight-merging methods) as the fine-tuned model.

An adapter directory is what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``, optionally with tokenizer files. The fine-tuned model it stands for
is the configured pre-trained model with the adapter merged in (``merge_and_unload``), so the
multi-stage method sees an ordinary full-parameter model with the base's architecture.

- The base is always the configured ``pretrained_model`` directory. When ``adapter_config.json``'s
  ``base_model_name_or_path`` names a local model directory (absolute, or relative to the working
  directory) whose content differs from it, that is an error; a hub id or a path that does not
  exist here cannot be checked and is accepted.
- The content id covers the base's content id and the adapter's files, so changing either is a
  new fine-tuned model.
- Weights are read from safetensors only: ``adapter_model.bin`` (pickle) is refused.
- The tokenizer is the adapter directory's when it has one, else the base's.

This module builds on ``models`` (which dispatches here for adapter directories).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import (
    _TOKENIZER_CORE, TOKENIZER_FILES, LoadedModel, ModelDirError, ModelDirInfo, _file_digest, _load,
    check_finite_weights, fingerprint_model_dir, validate_model_dir,
)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterDirInfo", "is_adapter_dir", "validate_adapter_dir",
    "fingerprint_adapter_dir", "load_adapter_model",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLE_ADAPTER = "adapter_model.bin"
# Task types whose merged model is a plain causal LM over the pre-trained base (None: not recorded).
_CAUSAL_TASKS = (None, "CAUSAL_LM")


@dataclass(frozen=True)
class AdapterDirInfo:
    """What validate_adapter_dir found in a PEFT adapter directory."""

    path: Path
    peft_type: str
    task_type: str | None
    base_model_name_or_path: str | None
    tokenizer_files: tuple[str, ...]

    @property
    def has_tokenizer(self) -> bool:
        return any(name in self.tokenizer_files for name in _TOKENIZER_CORE)


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding ``adapter_config.json`` (a PEFT adapter)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def validate_adapter_dir(path: str | os.PathLike[str]) -> AdapterDirInfo:
    """Check that ``path`` is a usable PEFT adapter directory (no weights read), or raise ModelDirError."""
    p = Path(path).expanduser()
    config_path = p / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelDirError(f"{p}: {ADAPTER_CONFIG} is missing; save the adapter with PeftModel.save_pretrained(dir)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{config_path}: not valid JSON ({exc}); save the adapter again with "
                            "PeftModel.save_pretrained(dir)") from exc
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise ModelDirError(f"{config_path}: field peft_type is missing; save the adapter again with "
                            "PeftModel.save_pretrained(dir)")
    if not (p / ADAPTER_WEIGHTS).is_file():
        if (p / _PICKLE_ADAPTER).is_file():
            raise ModelDirError(
                f"{p}: only {_PICKLE_ADAPTER} found; pickle weights are not loaded for safety — save the adapter "
                f"as {ADAPTER_WEIGHTS} with model.save_pretrained(dir, safe_serialization=True)")
        raise ModelDirError(f"{p}: {ADAPTER_WEIGHTS} is missing; save the adapter with PeftModel.save_pretrained(dir)")
    # transformers' from_pretrained would read such a folder as an adapter over whatever base it names,
    # so a directory that also holds full-model weights is ambiguous.
    full = sorted(f.name for f in p.glob("*.safetensors") if f.name != ADAPTER_WEIGHTS)
    if full:
        raise ModelDirError(f"{p}: holds both a PEFT adapter ({ADAPTER_CONFIG}) and full-model weights "
                            f"({', '.join(full)}); keep the adapter or the full model in this folder, not both")
    task_type = config.get("task_type")
    if task_type not in _CAUSAL_TASKS:
        raise ModelDirError(
            f"{config_path}: task_type {task_type!r} is not supported for an adapter (only CAUSAL_LM); merge it "
            "yourself (PeftModel.from_pretrained(base, dir).merge_and_unload()), save_pretrained() the merged "
            "model with its tokenizer and point finetuned_model at that folder")
    base = config.get("base_model_name_or_path")
    return AdapterDirInfo(
        path=p.resolve(), peft_type=config["peft_type"], task_type=task_type,
        base_model_name_or_path=base if isinstance(base, str) and base else None,
        tokenizer_files=tuple(name for name in TOKENIZER_FILES if (p / name).is_file()),
    )


def _check_base(info: AdapterDirInfo, base: ModelDirInfo, base_fingerprint: str) -> None:
    """Raise when the adapter names a local model directory other than (in content) the configured base."""
    named = info.base_model_name_or_path
    if named is None:
        return
    named_path = Path(named).expanduser()
    if not named_path.is_dir() or named_path.resolve() == base.path:
        return  # a hub id or a path from another machine: nothing here to compare with
    try:
        named_fingerprint = fingerprint_model_dir(named_path)
    except ModelDirError:
        return  # not a model directory, so not a different base either
    if named_fingerprint != base_fingerprint:
        raise ModelDirError(
            f"{info.path / ADAPTER_CONFIG}: base_model_name_or_path is {named!r}, a model directory whose content "
            f"differs from the configured pretrained_model {base.path}; the adapter would be merged into a model "
            "it was not trained on. Point pretrained_model at the adapter's base, or set base_model_name_or_path "
            "to the configured directory if the adapter was trained on it")


def fingerprint_adapter_dir(path: str | os.PathLike[str], base: str | os.PathLike[str] | None,
                            chunk_bytes: int = 1 << 20) -> str:
    """sha256 (hex) of the merged model: the base directory's content id, then the adapter's config,
    weights and tokenizer files (as in fingerprint_model_dir). Changes when either side changes."""
    info = validate_adapter_dir(path)
    if base is None:
        raise ModelDirError(f"{info.path} is a PEFT adapter directory: its content id needs the pre-trained "
                            "base it is merged into (pass base=<pretrained_model dir>)")
    base_info = validate_model_dir(base)
    base_fingerprint = fingerprint_model_dir(base_info.path, chunk_bytes)
    _check_base(info, base_info, base_fingerprint)
    digest = hashlib.sha256(b"peft-adapter\0" + base_fingerprint.encode("ascii"))
    for name in sorted({ADAPTER_CONFIG, ADAPTER_WEIGHTS, *info.tokenizer_files}):
        size, file_digest = _file_digest(info.path / name, chunk_bytes)
        digest.update(name.encode("utf-8") + b"\0" + size.to_bytes(8, "little") + file_digest)
    return digest.hexdigest()


def _peft_load(base_model: Any, info: AdapterDirInfo) -> Any:
    """The base with the adapter merged in; peft's warning about adapter keys it could not place is
    an error here (the adapter would be silently incomplete)."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(info.path))
    if config.is_prompt_learning:
        raise ModelDirError(f"{info.path / ADAPTER_CONFIG}: peft_type {info.peft_type} is prompt learning; it changes "
                            "the input, not the weights, so it cannot be merged into a fine-tuned model — use a "
                            "weight adapter such as LoRA")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(base_model, str(info.path), config=config, is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelDirError(f"{info.path}: the adapter does not fit the configured pretrained_model ({exc}); "
                                "point pretrained_model at the model the adapter was trained on") from exc
    for w in caught:
        if "missing adapter keys" in str(w.message):
            raise ModelDirError(f"{info.path / ADAPTER_WEIGHTS}: {w.message} — the file does not hold every "
                                f"module {ADAPTER_CONFIG} targets; save the adapter again with save_pretrained()")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not callable(getattr(peft_model.base_model, "merge_and_unload", None)):
        raise ModelDirError(f"{info.path / ADAPTER_CONFIG}: peft_type {info.peft_type} cannot be merged into the "
                            "base weights; merge-capable adapters (e.g. LoRA) only")
    try:
        return peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge: the merged weights would hold NaN/Inf
        raise ModelDirError(f"{info.path}: merging the adapter gives non-finite weights ({exc})") from exc


def load_adapter_model(path: str | os.PathLike[str], base: str | os.PathLike[str] | None, dtype: Any,
                       device: str | None, trust_remote_code: bool = False, **kwargs: Any) -> LoadedModel:
    """The pre-trained ``base`` (loaded in ``dtype``) with the adapter at ``path`` merged in, in eval
    mode on ``device``; the tokenizer is the adapter directory's if it has one, else the base's."""
    import torch

    info = validate_adapter_dir(path)
    if base is None:
        raise ModelDirError(f"{info.path} is a PEFT adapter directory: loading it needs the pre-trained base "
                            "it is merged into (pass base=<pretrained_model dir>)")
    base_info = validate_model_dir(base)
    _check_base(info, base_info, fingerprint_model_dir(base_info.path))
    check_finite_weights(ModelDirInfo(path=info.path, model_type=info.peft_type, architectures=(), task="causal_lm",
                                      weight_files=(ADAPTER_WEIGHTS,), tokenizer_files=info.tokenizer_files))
    # Merged on the CPU, then moved: peft would otherwise place adapter tensors on its own guess of device.
    loaded = _load(base_info, "causal_lm", dtype, "cpu", trust_remote_code, **kwargs)
    model = _peft_load(loaded.model, info)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    tokenizer = loaded.tokenizer
    if info.has_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(info.path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, task="causal_lm", info=base_info, adapter=info)
