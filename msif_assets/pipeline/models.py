"""Loading the two models once per step, with the compatibility check before any compute."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine import ModuleSpec, shared_modules
from ..lake.models import LoadedModel, fingerprint_model_dir, load_causal_lm, load_model_for_finetune
from .settings import ComputeSettings


def short_hash(fingerprint: str) -> str:
    """The partition key of a model: the first 16 hex digits of its content hash."""
    return fingerprint[:16]


@dataclass
class ModelPair:
    pt: LoadedModel
    ft: LoadedModel
    specs: list[ModuleSpec]
    pt_hash: str
    ft_hash: str


def load_pretrained(path: str | Path, settings: ComputeSettings) -> LoadedModel:
    return load_causal_lm(path, settings.torch_dtype, str(settings.torch_device), settings.trust_remote_code)


def load_finetuned(path: str | Path, settings: ComputeSettings) -> LoadedModel:
    return load_model_for_finetune(path, settings.torch_dtype, str(settings.torch_device), settings.trust_remote_code)


def load_pair(pt_dir: str | Path, ft_dir: str | Path, settings: ComputeSettings) -> ModelPair:
    """Both models plus the tracked modules they share (raises listing every mismatch)."""
    pt, ft = load_pretrained(pt_dir, settings), load_finetuned(ft_dir, settings)
    specs = shared_modules(pt.model, ft.model, settings.scope)
    return ModelPair(pt, ft, specs, short_hash(fingerprint_model_dir(pt_dir)), short_hash(fingerprint_model_dir(ft_dir)))


def model_window(loaded: LoadedModel, requested: int = 0) -> int:
    """Chunk length: ``requested`` if set, else the model's positional window."""
    window = getattr(loaded.model.config, "max_position_embeddings", None) or getattr(loaded.model.config, "n_positions", None)
    if requested:
        if window and requested > window:
            raise ValueError(f"max_chunk_tokens={requested} exceeds the model window {window}")
        return requested
    if not window:
        raise ValueError("the model config states no window; set max_chunk_tokens")
    return int(window)


def check_pair(pt_dir: str | Path, ft_dir: str | Path, settings: ComputeSettings) -> list[ModuleSpec]:
    """The compatibility check, from the two configs alone (models built on the meta device,
    no weights read): raises ``IncompatibleModelsError`` listing every mismatch."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    def skeleton(path):
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=settings.trust_remote_code)
        is_cls = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        cls = AutoModelForSequenceClassification if is_cls else AutoModelForCausalLM
        with torch.device("meta"):
            return cls.from_config(config, trust_remote_code=settings.trust_remote_code)

    return shared_modules(skeleton(pt_dir), skeleton(ft_dir), settings.scope)
