"""ComputeResource (what Dagster's UI and msif.toml configure) mirrors ComputeSettings (what the
pipeline reads) field by field; a field added to one and not the other must fail here."""

from __future__ import annotations

import dataclasses

from msif_assets.defs.resources import ComputeResource
from msif_assets.pipeline.settings import ComputeSettings


def test_compute_resource_mirrors_settings_with_the_same_defaults():
    settings_defaults = {f.name: f.default for f in dataclasses.fields(ComputeSettings)}
    resource = ComputeResource()
    assert set(resource.model_dump()) == set(settings_defaults)
    assert resource.settings() == ComputeSettings()


def test_compute_resource_passes_every_field_through():
    resource = ComputeResource(batch_size=3, dampings=["abs:0.01"], methods=["gdp"], split_heads=False)
    settings = resource.settings()
    assert (settings.batch_size, settings.dampings, settings.methods, settings.split_heads) == (3, ("abs:0.01",), ("gdp",), False)
