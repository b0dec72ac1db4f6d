"""Progress lines name their asset and partition (``pt_covariance [shard-03]: covariance:
batch 22/64, 41.0s``) without a label threaded through every step: the engine's
:class:`~msif_assets.engine.traversal.Progress` asks a label source, and this one reads the
running asset's key and partition from Dagster's execution context."""

import dagster as dg

from ..engine.traversal import set_progress_label_source


def running_asset_label() -> str:
    """``"<asset> [<partition>]"`` of the asset step running in this thread, or ``""``."""
    try:
        context = dg.AssetExecutionContext.get()
    except Exception:  # outside a step (a notebook, a test calling the pipeline directly)
        return ""
    try:
        name = context.asset_key.to_user_string()
    except Exception:  # a step that materializes several assets
        name = context.op_def.name
    return f"{name} [{context.partition_key}]" if context.has_partition_key else name


def install_progress_labels() -> None:
    set_progress_label_source(running_asset_label)
