"""Dagster resources: where the lake is, what the user brought, and how to compute."""


from pathlib import Path

import dagster as dg

from ..lake.layout import LakeLayout
from ..pipeline.settings import ALL_METHODS, ComputeSettings


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

    def path(self, name: str) -> Path:
        return Path(getattr(self, name)).expanduser().resolve()


class ComputeResource(dg.ConfigurableResource):
    """How influence is computed; every field is documented on ``ComputeSettings``."""

    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 8
    max_chunk_tokens: int = 0
    labels: str = "sampled"
    stats_dtype: str = "auto"
    seed: int = 0
    split_heads: bool = True
    scope: str = "all"
    factor_shards: list[str] = []
    methods: list[str] = list(ALL_METHODS)
    dampings: list[str] = ["rel:0.1"]
    knn_k: int = 20
    bm25_k: int = 0
    all_chunks_below: int = 0
    max_new_tokens: int = 8
    trust_remote_code: bool = False
    embedding_model_dir: str = ""

    def settings(self) -> ComputeSettings:
        fields = self.model_dump()
        for name in ("factor_shards", "methods", "dampings"):
            fields[name] = tuple(fields[name])
        return ComputeSettings(**fields)
