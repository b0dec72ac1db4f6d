"""ComputeResource (what Dagster's UI and run config set) is generated from ComputeSettings: the
same fields, defaults and help, validated when the resource is built."""

from __future__ import annotations

import dataclasses

import pydantic
import pytest

from msif_assets.defs.resources import ComputeResource
from msif_assets.engine import Damping
from msif_assets.pipeline.settings import ComputeSettings


def test_the_resource_has_exactly_the_settings_fields_with_their_help():
    fields = {f.name: f for f in dataclasses.fields(ComputeSettings)}
    assert set(ComputeResource.model_fields) == set(fields)
    for name, f in fields.items():
        assert ComputeResource.model_fields[name].description == f.metadata["help"]
    assert ComputeResource().settings == ComputeSettings()


def test_the_resource_parses_run_config_once_into_typed_settings():
    resource = ComputeResource(batch_size=3, dampings=["abs:0.01"], methods=["gdp"], split_heads=False)
    settings = resource.settings
    assert (settings.batch_size, settings.dampings, settings.methods, settings.split_heads) == (3, (Damping("absolute", 0.01),), ("gdp",), False)
    assert resource.settings is settings
    assert ComputeResource.from_settings(settings).settings == settings


def test_a_bad_run_config_value_fails_when_the_resource_is_built():
    with pytest.raises(pydantic.ValidationError, match="abs:inf"):
        ComputeResource(dampings=["abs:inf"])
