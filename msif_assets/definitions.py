"""Dagster entry point (``workspace.yaml`` and ``[tool.dagster]`` point here)."""

from .defs.build import build_definitions
from .config import load_config

defs = build_definitions(load_config())
