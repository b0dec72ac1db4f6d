"""Corpus shards → token chunks → embeddings in LanceDB, one dynamic partition per shard.

``inbox_files[shard]`` is the shard's input as observed on disk: its data version is the
chained content hash of the inbox files (``pipeline.corpus.inbox_versions``), recorded by
:func:`record_inbox_observations` (from ``msif materialize`` and the inbox sensor). An edited
shard file is a new data version, so automation re-ingests that shard and refreshes what
depends on it.
"""


from pathlib import Path

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster._core.definitions.external_asset import create_external_asset_from_source_asset

from ..lake import tables
from ..lake.embeddings import load_sentence_encoder
from ..lake.models import load_tokenizer
from ..pipeline.corpus import (
    InboxScan, chunk_shard, embed_shard, files_digest, files_stat, inbox_versions, ingest_shard, scan_inbox,
)
from .automation import files_version, refresh_on_change, table_version
from .executors import HEAVY_OP_TAGS
from .inputs import pretrained_tokenizer
from .resources import ComputeResource, InputsResource, LakeResource

SHARDS = dg.DynamicPartitionsDefinition(name="shards")
GROUP = "corpus"
INBOX_FILES = dg.AssetKey("inbox_files")
_STAT, _DIGEST = "msif/stat", "msif/digest"  # observation metadata: a cache of the file hashes


def inbox_observations(instance: dg.DagsterInstance, scan: InboxScan, shards: set[str] | None = None) -> list[dg.AssetObservation]:
    """Observations of ``inbox_files`` for the registered shards (or ``shards``) whose input
    changed since their last observation. Files are hashed only when their size, mtime or
    inode changed (the last observation caches the hash with those)."""
    registered = set(instance.get_dynamic_partitions(SHARDS.name)) if shards is None else set(shards)
    previous, stats, digests = {}, {}, {}
    for shard, files in scan.shards.items():
        record = next(iter(instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=INBOX_FILES, asset_partitions=[shard]), limit=1).records), None)
        observation = record.asset_observation if record else None
        meta = {k: getattr(v, "value", v) for k, v in (observation.metadata if observation else {}).items()}
        tags = observation.tags if observation else {}
        previous[shard] = (tags.get(DATA_VERSION_TAG), meta.get(_STAT))
        stats[shard] = files_stat(files)
        digests[shard] = meta.get(_DIGEST) if meta.get(_STAT) == stats[shard] and meta.get(_DIGEST) else files_digest(files)
    versions = inbox_versions(digests)
    return [
        dg.AssetObservation(
            asset_key=INBOX_FILES, partition=shard, tags={DATA_VERSION_TAG: versions[shard]},
            metadata={_STAT: stats[shard], _DIGEST: digests[shard], "files": ", ".join(str(f) for f in scan.shards[shard])},
        )
        for shard in sorted(scan.shards)
        if shard in registered and previous[shard] != (versions[shard], stats[shard])
    ]


def record_inbox_observations(instance: dg.DagsterInstance, inbox: str | Path, scan: InboxScan | None = None) -> list[str]:
    """Record what changed in the inbox for the registered shards; returns those shards."""
    events = inbox_observations(instance, scan if scan is not None else scan_inbox(inbox))
    for event in events:
        instance.report_runless_asset_event(event)
    return [e.partition for e in events]


@dg.observable_source_asset(partitions_def=SHARDS, group_name=GROUP, key=INBOX_FILES,
                            description="Each shard's inbox file(s), by content hash chained in shard-name order "
                                        "(a shard rejects doc_ids that a shard named before it has).")
def _inbox_files(context, inputs: InputsResource) -> dg.DataVersionsByPartition:
    scan = scan_inbox(inputs.path("inbox"))
    for problem in scan.problems:
        context.log.warning(problem)
    for event in inbox_observations(context.instance, scan):
        context.log_event(event)  # with the hash cache; versions unchanged since last time are not repeated
    return dg.DataVersionsByPartition({})


# As an AssetsDefinition: the inbox sensor targets its key, and build.py can add upstream edges (default_world).
inbox_files = create_external_asset_from_source_asset(_inbox_files)


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[inbox_files], automation_condition=refresh_on_change(), kinds={"parquet"})
def corpus_shards(context: dg.AssetExecutionContext, lake: LakeResource, inputs: InputsResource) -> dg.MaterializeResult:
    """Documents of one inbox file; malformed rows and doc_ids that a shard named before this
    one has go to the rejects table, never dropped."""
    layout, shard = lake.layout(), context.partition_key
    result = ingest_shard(layout, inputs.path("inbox"), shard, inputs.corpus_columns())
    docs = tables.read_docs(layout, shard)
    for warning in result.warnings:
        context.log.warning(warning)
    if result.rejects:
        context.log.warning(f"shard {shard}: {result.rejects} rows rejected — SELECT * FROM rejects WHERE source = 'corpus-{shard}'")
    if not result.documents:
        context.log.warning(f"shard {shard}: no document accepted — its chunks, embeddings, candidates and scores are empty")
    return dg.MaterializeResult(
        metadata={"documents": result.documents, "rejects": result.rejects, "cross_shard_duplicates": result.cross_shard_duplicates,
                  "files": ", ".join(result.files)},
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


@dg.asset(partitions_def=SHARDS, group_name=GROUP, deps=[doc_chunks], automation_condition=refresh_on_change(), kinds={"lancedb"},
          op_tags=HEAVY_OP_TAGS)
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
