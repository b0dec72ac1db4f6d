"""Options shared by every command: where the lake is."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ENV_LAKE = "MSIF_LAKE"


def lake_option() -> argparse.ArgumentParser:
    """A parent parser adding ``--lake DIR`` to a subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--lake", default=None, metavar="DIR", help=f"lake root (default: ${ENV_LAKE} or ./lake)")
    return parent


def lake_root(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "lake", None) or os.environ.get(ENV_LAKE) or "lake")
