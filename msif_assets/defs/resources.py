"""Dagster resources: where the lake is, what the user brought, and how to compute."""

import dataclasses
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
from pydantic import Field, PrivateAttr

from ..engine import Damping
from ..lake.inputs import CorpusColumns
from ..lake.layout import LakeLayout
from ..pipeline.models import ModelIds
from ..pipeline.settings import ComputeSettings


class LakeResource(dg.ConfigurableResource):
    """The lake's root directory (Parquet, LanceDB and safetensors live below it)."""

    root: str = "lake"

    def layout(self) -> LakeLayout:
        return LakeLayout(self.root)


class InputsResource(dg.ConfigurableResource):
    """What the user brings: an inbox of corpus shard files, two Hugging Face model
    directories, a fine-tuning data sample and a queries file (formats: README)."""

    inbox: str
    pretrained_model: str
    finetuned_model: str
    finetune_data: str
    queries: str
    text_column: str = Field(default="text", description="Corpus field/column holding the document text.")
    id_column: str | None = Field(default=None, description="Corpus field/column holding the document id; "
                                  "unset: doc_id, or derived <shard>:<row> ids for a columnar shard without it.")
    _model_ids: ModelIds | None = PrivateAttr(default=None)

    def path(self, name: str) -> Path:
        return Path(getattr(self, name)).expanduser().resolve()

    def corpus_columns(self) -> CorpusColumns:
        return CorpusColumns(text=self.text_column, id=self.id_column)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._model_ids = None  # resolved on first use, then fixed for the rest of the run

    @property
    def model_ids(self) -> ModelIds:
        """The two models' content ids, hashed once per run: every step of a run agrees on them."""
        if self._model_ids is None:
            self._model_ids = ModelIds.of(self.path("pretrained_model"), self.path("finetuned_model"))
        return self._model_ids


class _ComputeResourceBase(dg.ConfigurableResource):
    _settings: ComputeSettings = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._settings = ComputeSettings.from_config(self.model_dump(), "compute resource")

    @property
    def settings(self) -> ComputeSettings:
        """The validated settings (parsed once, when the resource was built)."""
        return self._settings

    @classmethod
    def from_settings(cls, settings: ComputeSettings) -> "ComputeResource":
        return cls(**settings.to_config())


def _config_field(f: dataclasses.Field) -> tuple[type, Any]:
    default = f.default
    if isinstance(default, tuple):
        plain = [d.label if isinstance(d, Damping) else d for d in default]
        return list[str], Field(default=plain, description=f.metadata["help"])
    return type(default), Field(default=default, description=f.metadata["help"])


# Generated from ComputeSettings' fields (types, defaults, help), so the run config schema the
# Dagster UI shows is exactly the settings type, with nothing to keep in sync by hand.
ComputeResource = pydantic.create_model(
    "ComputeResource", __base__=_ComputeResourceBase, __module__=__name__,
    __doc__="How influence is computed (``[compute]`` in msif.toml; help on each field).",
    **{f.name: _config_field(f) for f in dataclasses.fields(ComputeSettings)},
)
