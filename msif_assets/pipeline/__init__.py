"""The steps of the lineage as plain functions: read the lake, call the engine, write the lake.

No Dagster here: ``defs/`` wraps each step in an asset; a notebook can call them directly.
"""
