"""What the user brings, observed by content hash: a new hash is a new data version, and
only the assets downstream of that input refresh."""


import hashlib
from pathlib import Path

import dagster as dg

from ..lake.models import fingerprint_model_dir, validate_model_dir
from .resources import InputsResource

GROUP = "inputs"


def _file_hash(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist — check the [inputs] section of msif.toml")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:24]


def _tokenizer_hash(model_dir: Path) -> str:
    info = validate_model_dir(model_dir)
    digest = hashlib.sha256()
    for name in sorted(info.tokenizer_files):
        digest.update(name.encode())
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:24]


@dg.observable_source_asset(group_name=GROUP, description="Tokenizer files of the pre-trained model (chunking depends on these only).")
def pretrained_tokenizer(inputs: InputsResource) -> dg.DataVersion:
    return dg.DataVersion(_tokenizer_hash(inputs.path("pretrained_model")))


@dg.observable_source_asset(group_name=GROUP, description="Pre-trained model directory (config + safetensors), by content hash.")
def pretrained_model(inputs: InputsResource) -> dg.DataVersion:
    return dg.DataVersion(fingerprint_model_dir(inputs.path("pretrained_model"))[:24])


@dg.observable_source_asset(group_name=GROUP, description="Fine-tuned model directory, or PEFT adapter directory "
                            "(its hash covers the pre-trained base too), by content hash.")
def finetuned_model(inputs: InputsResource) -> dg.DataVersion:
    return dg.DataVersion(fingerprint_model_dir(inputs.path("finetuned_model"), base=inputs.path("pretrained_model"))[:24])


@dg.observable_source_asset(group_name=GROUP, description="Sample of the fine-tuning data (JSONL) for the fine-tuned factors.")
def finetune_data(inputs: InputsResource) -> dg.DataVersion:
    return dg.DataVersion(_file_hash(inputs.path("finetune_data")))


@dg.observable_source_asset(group_name=GROUP, description="Queries JSONL: query_id, prompt, optional completion.")
def queries_file(inputs: InputsResource) -> dg.DataVersion:
    return dg.DataVersion(_file_hash(inputs.path("queries")))


SOURCES = [pretrained_tokenizer, pretrained_model, finetuned_model, finetune_data, queries_file]
