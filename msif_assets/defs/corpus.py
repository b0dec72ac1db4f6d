"""Corpus shards → token chunks → embeddings in LanceDB, one dynamic partition per shard."""


import dagster as dg

from ..lake import tables
from ..lake.embeddings import load_sentence_encoder
from ..lake.models import load_tokenizer
from ..pipeline.corpus import chunk_shard, embed_shard, ingest_shard
from .automation import files_version, refresh_on_change, table_version
from .inputs import pretrained_tokenizer
from .resources import ComputeResource, InputsResource, LakeResource

SHARDS = dg.DynamicPartitionsDefinition(name="shards")
GROUP = "corpus"


@dg.asset(partitions_def=SHARDS, group_name=GROUP, automation_condition=refresh_on_change(), kinds={"parquet"})
def corpus_shards(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource) -> dg.MaterializeResult:
    """Documents of one inbox file; malformed rows go to the rejects table, never dropped."""
    layout, shard = lake.layout(), context.partition_key
    result = ingest_shard(layout, inputs.path("inbox"), shard)
    docs = tables.read_docs(layout, shard)
    if result.rejects:
        context.log.warning(f"shard {shard}: {result.rejects} rows rejected — SELECT * FROM rejects WHERE source = 'corpus-{shard}'")
    return dg.MaterializeResult(
        metadata={"documents": result.documents, "rejects": result.rejects, "files": ", ".join(result.files)},
        data_version=table_version(docs),
    )


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[corpus_shards, pretrained_tokenizer], automation_condition=refresh_on_change(), kinds={"parquet"})
def doc_chunks(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Token chunks of at most the model window; long documents are split, never truncated."""
    settings = compute.settings
    tokenizer, window = load_tokenizer(inputs.path("pretrained_model"), settings.trust_remote_code)
    max_tokens = settings.max_chunk_tokens or window
    if not max_tokens:
        raise ValueError("the pre-trained model's config states no window (e.g. BLOOM/ALiBi): set [compute] max_chunk_tokens")
    # one slot for the BOS token that gives each chunk's first token a context
    chunks = chunk_shard(lake.layout(), context.partition_key, tokenizer, max_tokens - int(tokenizer.bos_token_id is not None))
    return dg.MaterializeResult(
        metadata={"chunks": chunks.num_rows, "documents": len(set(chunks.column("doc_id").to_pylist())), "max_tokens": max_tokens},
        data_version=table_version(chunks),
    )


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[doc_chunks], automation_condition=refresh_on_change(), kinds={"lancedb"})
def doc_embeddings(context: dg.AssetExecutionContext, lake: LakeResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Sentence-transformer embeddings of every chunk, replaced per shard in LanceDB."""
    settings = compute.settings
    encoder = load_sentence_encoder(settings.embedding_model_dir or None, str(settings.torch_device))
    count = embed_shard(lake.layout(), context.partition_key, encoder)
    layout = lake.layout()
    return dg.MaterializeResult(
        metadata={"vectors": count},
        data_version=files_version([layout.chunks_file(context.partition_key)]),
    )
