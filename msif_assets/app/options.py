"""Options shared by every command: where the lake is."""

from __future__ import annotations

import argparse
import os
from ..lake.storage import LakePath, lake_path

ENV_LAKE = "MSIF_LAKE"


def lake_option() -> argparse.ArgumentParser:
    """A parent parser adding ``--lake DIR`` to a subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--lake", default=None, metavar="DIR", help=f"lake root: a directory or s3://bucket/prefix (default: ${ENV_LAKE} or ./lake)")
    return parent


def lake_root(args: argparse.Namespace) -> LakePath:
    """The lake root: a local directory or an object-store URI such as s3://bucket/prefix."""
    return lake_path(getattr(args, "lake", None) or os.environ.get(ENV_LAKE) or "lake")
