"""Model identity and loading: content ids resolved once per run, both models loaded once per
step, and the compatibility check from configs before any compute."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine import ModuleSpec, shared_modules
from ..lake.adapters import is_adapter_dir
from ..lake.models import LoadedModel, fingerprint_model_dir, load_causal_lm, load_model_for_finetune
from .settings import ComputeSettings


@dataclass(frozen=True)
class ModelIds:
    """The two models' content ids: the first 16 hex digits of each directory's content hash.
    They key every factor, query-gradient and score file, and fill the ``pt_model``/``ft_model``
    columns. A fine-tuned PEFT adapter's id covers the pre-trained base too."""

    pt: str
    ft: str

    @classmethod
    def of(cls, pt_dir: str | Path, ft_dir: str | Path) -> "ModelIds":
        return cls(fingerprint_model_dir(pt_dir)[:16], fingerprint_model_dir(ft_dir, base=pt_dir)[:16])


@dataclass
class ModelPair:
    pt: LoadedModel
    ft: LoadedModel
    specs: list[ModuleSpec]
    ids: ModelIds


def load_pretrained(path: str | Path, settings: ComputeSettings) -> LoadedModel:
    return load_causal_lm(path, settings.torch_dtype, str(settings.torch_device), settings.trust_remote_code)


def load_finetuned(path: str | Path, settings: ComputeSettings, base: str | Path | None = None) -> LoadedModel:
    """The fine-tuned model; ``base`` (the pre-trained directory) is needed when ``path`` is a PEFT adapter."""
    return load_model_for_finetune(path, settings.torch_dtype, str(settings.torch_device), settings.trust_remote_code,
                                   base=base)


def load_pair(pt_dir: str | Path, ft_dir: str | Path, ids: ModelIds, settings: ComputeSettings) -> ModelPair:
    """Both models plus the tracked modules they share (raises listing every mismatch)."""
    pt, ft = load_pretrained(pt_dir, settings), load_finetuned(ft_dir, settings, base=pt_dir)
    return ModelPair(pt, ft, shared_modules(pt.model, ft.model, settings.scope), ids)


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

    # a merged PEFT adapter has its base's architecture
    return shared_modules(skeleton(pt_dir), skeleton(pt_dir if is_adapter_dir(ft_dir) else ft_dir), settings.scope)
